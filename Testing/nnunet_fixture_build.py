"""Build a tiny, real nnU-Net v2 model folder with nnunetv2's own commands (run in a subprocess).

Usage::

    python Testing/nnunet_fixture_build.py OUT_DIR CT_IMAGE CT_LABEL TEST_CT [--epochs N] [--iterations N] [--seed N]

``CT_IMAGE``/``CT_LABEL``: a real CT and its label map (the fetched TotalSegmentator S1 scan, 3 mm);
``TEST_CT``: another real CT (S3, 0.98 x 0.98 x 2 mm). The script writes, under ``OUT_DIR``:

* ``raw/Dataset001_TinyCT``: 5 training crops of ``CT_IMAGE`` (48 x 80 x 80 voxels around the
  liver, labels ``liver`` = 1, ``spleen`` = 2, everything else 0), and in ``imagesTs`` two crops of
  ``TEST_CT``: ``s3crop`` (20 x 192 x 192, as stored) and ``s3aniso`` (every second slice: 4 mm,
  an anisotropic case that takes nnU-Net's separate-z resampling path);
* ``pre``: nnU-Net's fingerprint, plans (``nnUNetPlans.json`` + a ``3d_tiny`` configuration that
  inherits from ``3d_fullres``: 4 stages of 4-8-16-32 features, patch 32^3) and preprocessed data;
* ``res/Dataset001_TinyCT/nnUNetTrainer__nnUNetPlans__3d_tiny/fold_0/checkpoint_{final,best}.pth``
  trained by ``nnUNetTrainer`` itself on CPU (15 epochs of 10 iterations, seeded), then checked with
  ``nnUNetPredictor``: liver Dice on the first training crop (usually 0.5-0.7) and foreground in both
  test crops. A model that fails the check is trained again with the next seed (at most 3 times).

It prints one JSON line ``{"model_folder": ..., "raw_dataset": ..., "attempts": [...]}`` at the end.

Why a script: ``nnunetv2.paths`` reads ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` at
import, and fingerprinting/preprocessing spawn worker processes that re-import the main module,
which must therefore be guarded by ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

DATASET_ID = 1
DATASET_NAME = "Dataset001_TinyCT"
CONFIGURATION = "3d_tiny"
TINY_FEATURES = [4, 8, 16, 32]
TRAIN_CROP_ZYX = (48, 80, 80)
#: (z, y, x) offsets of the training crops relative to the centred crop, in voxels
TRAIN_OFFSETS = [(0, 0, 0), (-6, 4, -4), (5, -5, 6), (-3, -6, -6), (4, 6, 3)]
LABEL_MAP = {1: 1, 2: 2}  # source liver -> 1, spleen -> 2
#: a model is kept when its liver Dice on the first training crop reaches this and it finds foreground in both
#: test crops; otherwise training starts again with the next seed, at most MAX_ATTEMPTS times
MIN_TRAIN_LIVER_DICE = 0.45
MAX_ATTEMPTS = 3


def _crop(image, start_zyx, size_zyx):
    """A sub-image (SimpleITK slicing keeps origin, spacing and direction consistent)."""
    z0, y0, x0 = (int(v) for v in start_zyx)
    dz, dy, dx = size_zyx
    return image[x0:x0 + dx, y0:y0 + dy, z0:z0 + dz]


def write_dataset(raw: Path, ct_image: str, ct_label: str, test_ct: str) -> Path:
    import numpy as np
    import SimpleITK as sitk

    ds = raw / DATASET_NAME
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(ct_image)
    label = sitk.ReadImage(ct_label)
    lab = sitk.GetArrayFromImage(label)
    shape = np.array(lab.shape)
    size = np.array(TRAIN_CROP_ZYX)
    centre = np.round(np.argwhere(lab == 1).mean(axis=0)).astype(int)
    for n, offset in enumerate(TRAIN_OFFSETS):
        start = np.clip(centre - size // 2 + np.array(offset), 0, shape - size)
        img_crop = _crop(image, start, size)
        lab_arr = sitk.GetArrayFromImage(_crop(label, start, size))
        out = np.zeros(lab_arr.shape, np.uint8)
        for src, dst in LABEL_MAP.items():
            out[lab_arr == src] = dst
        lab_img = sitk.GetImageFromArray(out)
        lab_img.CopyInformation(img_crop)
        sitk.WriteImage(sitk.Cast(img_crop, sitk.sitkFloat32), str(ds / "imagesTr" / f"ct_{n:03d}_0000.nii.gz"))
        sitk.WriteImage(lab_img, str(ds / "labelsTr" / f"ct_{n:03d}.nii.gz"))

    test = sitk.ReadImage(test_ct)
    test_arr = sitk.GetArrayFromImage(test)
    body = np.argwhere(test_arr > -300)
    cy, cx = np.round(body[:, 1:].mean(axis=0)).astype(int)
    y0 = int(np.clip(cy - 96 - 40, 0, test_arr.shape[1] - 192))  # towards the liver (image left)
    x0 = int(np.clip(cx - 96 - 60, 0, test_arr.shape[2] - 192))
    crop = test[x0:x0 + 192, y0:y0 + 192, :]
    sitk.WriteImage(crop, str(ds / "imagesTs" / "s3crop_0000.nii.gz"))
    sitk.WriteImage(crop[:, :, ::2], str(ds / "imagesTs" / "s3aniso_0000.nii.gz"))

    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
                    "numTraining": len(TRAIN_OFFSETS), "file_ending": ".nii.gz", "name": DATASET_NAME}
    (ds / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return ds


def add_tiny_configuration(plans_file: Path) -> None:
    """Add ``3d_tiny`` (inherits 3d_fullres: same data, spacing, normalisation; a 4-stage net)."""
    plans = json.loads(plans_file.read_text())
    full = plans["configurations"]["3d_fullres"]
    arch = json.loads(json.dumps(full["architecture"]))
    kw = arch["arch_kwargs"]
    n = len(TINY_FEATURES)
    kw["n_stages"] = n
    kw["features_per_stage"] = list(TINY_FEATURES)
    for key in ("kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
        if key in kw:
            kw[key] = kw[key][:n]
    kw["strides"] = [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)
    kw["n_conv_per_stage_decoder"] = kw["n_conv_per_stage_decoder"][:n - 1]
    plans["configurations"][CONFIGURATION] = {
        "inherits_from": "3d_fullres", "patch_size": [32, 32, 32], "batch_size": 2, "architecture": arch}
    plans_file.write_text(json.dumps(plans, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("ct_image")
    parser.add_argument("ct_label")
    parser.add_argument("test_ct")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = Path(args.out_dir).resolve()
    env = {"nnUNet_raw": out / "raw", "nnUNet_preprocessed": out / "pre", "nnUNet_results": out / "res"}
    for key, value in env.items():
        value.mkdir(parents=True, exist_ok=True)
        os.environ[key] = str(value)
    ds = write_dataset(out / "raw", args.ct_image, args.ct_label, args.test_ct)

    import torch

    torch.set_num_threads(1)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)

    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, verbose=False,
                         show_progress_bar=False)
    plans_name = plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], plans_name, configurations=("3d_fullres",), num_processes=(1,), verbose=False,
               show_progress_bar=False)
    add_tiny_configuration(out / "pre" / DATASET_NAME / f"{plans_name}.json")

    os.environ["nnUNet_n_proc_DA"] = "0"  # single-threaded augmentation (never while planning)
    folder = out / "res" / DATASET_NAME / f"nnUNetTrainer__{plans_name}__{CONFIGURATION}"
    attempts = []
    for seed in range(args.seed, args.seed + MAX_ATTEMPTS):
        shutil.rmtree(folder, ignore_errors=True)
        train(plans_name, seed, args.epochs, args.iterations)
        if not (folder / "fold_0" / "checkpoint_final.pth").is_file():
            print(f"training did not write {folder / 'fold_0' / 'checkpoint_final.pth'}", file=sys.stderr)
            return 1
        quality = check_quality(folder, ds)
        attempts.append(dict(seed=seed, **quality))
        if quality["train_liver_dice"] >= MIN_TRAIN_LIVER_DICE and min(quality["test_foreground_voxels"].values()) > 0:
            break
    else:
        print(f"no usable model in {MAX_ATTEMPTS} attempts: {attempts}", file=sys.stderr)
        return 1
    print(json.dumps({"model_folder": str(folder), "raw_dataset": str(ds), "attempts": attempts}))
    return 0


def train(plans_name: str, seed: int, epochs: int, iterations: int, dataset_id: int = DATASET_ID,
          configuration: str = CONFIGURATION, fold: int | str = 0, val_iterations: int = 2) -> None:
    """``nnUNetTrainer`` on ``fold`` (default 0), seeded: nnU-Net's augmentation draws from numpy's and Python's
    global generators (here in this process: no augmentation workers), the network from torch's.
    ``benchmarks/nnunet_folder.py`` reuses it for its real-size teacher."""
    import random

    import numpy as np
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    trainer = get_trainer_from_args(str(dataset_id), configuration, fold, "nnUNetTrainer", plans_name, False,
                                    device=torch.device("cpu"))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    trainer.logger.plot_progress_png = lambda *a, **k: None
    trainer.run_training()


def check_quality(folder: Path, ds: Path) -> dict:
    """What the tests rely on, measured with ``nnUNetPredictor``: liver Dice on the first training crop and
    foreground voxels in each test crop. 150 iterations usually give a liver Dice of 0.5-0.7, but a run can
    still sit at all-background (seen on CI once: another CPU, another trajectory), hence the check."""
    import numpy as np
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
    io = SimpleITKIO()
    data, props = io.read_images([str(ds / "imagesTr" / "ct_000_0000.nii.gz")])
    predicted = predictor.predict_single_npy_array(data, props, None, None, False) == 1
    truth = io.read_seg(str(ds / "labelsTr" / "ct_000.nii.gz"))[0][0] == 1
    dice = 2 * np.logical_and(predicted, truth).sum() / max(1, predicted.sum() + truth.sum())
    foreground = {}
    for case in ("s3crop", "s3aniso"):
        data, props = io.read_images([str(ds / "imagesTs" / f"{case}_0000.nii.gz")])
        foreground[case] = int((predictor.predict_single_npy_array(data, props, None, None, False) > 0).sum())
    return {"train_liver_dice": round(float(dice), 3), "test_foreground_voxels": foreground}


if __name__ == "__main__":
    sys.exit(main())
