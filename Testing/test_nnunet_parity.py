"""Parity with nnU-Net itself: ReCoKD's prediction with an nnU-Net model folder equals ``nnUNetPredictor``'s.

The folder is the session fixture ``nnunet_model_folder``, trained by nnunetv2's own
``nnUNetTrainer`` on crops of a real CT (S1); the images are crops of another real CT (S3): one as
stored (0.98 x 0.98 x 2 mm, resampled to 3 mm with 3D splines) and one with 4 mm slices (anisotropic:
nnU-Net's separate-z resampling). The reference is ``nnUNetPredictor`` (trainer ``nnUNetTrainer``, the
only one loadable with CPU torch here) on the same folder and image, with test-time mirroring.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")
pytest.importorskip("dynamic_network_architectures")

from ReCoKDLib.nnunet.checkpoint import load_nnunet_checkpoint  # noqa: E402
from ReCoKDLib.nnunet.predict import predict_case, predict_file  # noqa: E402
from ReCoKDLib.nnunet.preprocess import preprocess_case  # noqa: E402
from ReCoKDLib.nnunet.teacher import load_nnunet_model  # noqa: E402

torch.set_num_threads(1)
CASES = ("s3crop", "s3aniso")


def _predictor(folder, folds=(0,), checkpoint_name="checkpoint_final.pth", use_mirroring=True):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), folds, checkpoint_name)
    return predictor


def _read(raw_dataset, case):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    return SimpleITKIO().read_images([str(raw_dataset / "imagesTs" / f"{case}_0000.nii.gz")])


def _agreement(ours: np.ndarray, ref: np.ndarray, num_classes: int) -> tuple[float, dict[int, float]]:
    dice = {}
    for c in range(1, num_classes):
        a, b = ours == c, ref == c
        if a.any() or b.any():
            dice[c] = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    return float((ours == ref).mean()), dice


@pytest.fixture(scope="module")
def references(nnunet_model_folder):
    """nnUNetPredictor's labels and probabilities (mirroring on) per test case."""
    folder, raw = nnunet_model_folder
    predictor = _predictor(folder)
    out = {}
    for case in CASES:
        data, props = _read(raw, case)
        seg, probs = predictor.predict_single_npy_array(data, props, None, None, True)
        out[case] = (data, props, seg, probs)
    return out


@pytest.fixture(scope="module")
def teacher(nnunet_model_folder):
    return load_nnunet_model(nnunet_model_folder.model_folder)


@pytest.mark.parametrize("case", CASES)
def test_prediction_equals_nnunet_predictor(case, references, teacher, nnunet_model_folder):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    data, props, ref_seg, ref_probs = references[case]
    predictor = _predictor(nnunet_model_folder.model_folder)
    ref_data, _, _ = DefaultPreprocessor(verbose=False).run_case_npy(
        data.copy(), None, dict(props), predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json)
    ours_data, _ = preprocess_case(data, props["spacing"], teacher.folder)
    assert ours_data.shape == ref_data.shape and np.array_equal(ours_data, ref_data)

    labels, probs = predict_case(teacher, data, props["spacing"], use_mirroring=True, return_probabilities=True)
    assert labels.shape == ref_seg.shape == data.shape[1:]
    agreement, dice = _agreement(labels, ref_seg, teacher.card.num_classes)
    assert agreement >= 0.999, agreement
    assert all(d >= 0.999 for d in dice.values()), dice
    assert np.abs(probs - ref_probs).max() < 1e-3
    # the teacher is not trivial: its probabilities vary (a constant prediction would make parity vacuous)
    assert ref_probs[1:].max() > 0.2 and ref_probs[0].min() < 0.8


def test_foreground_is_reproduced(references, teacher):
    """At least one case has foreground in nnU-Net's prediction, and ours matches it class by class."""
    found = 0
    for case in CASES:
        data, props, ref_seg, _ = references[case]
        labels = predict_case(teacher, data, props["spacing"], use_mirroring=True)
        _, dice = _agreement(labels, ref_seg, teacher.card.num_classes)
        found += len(dice)
        assert all(d >= 0.999 for d in dice.values()), (case, dice)
    assert found >= 1


def test_two_folds_and_best_checkpoint(nnunet_model_folder, tmp_path):
    """Fold averaging (a second fold with other weights) and checkpoint_best, against nnUNetPredictor."""
    folder, raw = nnunet_model_folder
    copy = tmp_path / folder.parent.name / folder.name
    shutil.copytree(folder, copy)
    ckpt = load_nnunet_checkpoint(copy / "fold_0" / "checkpoint_best.pth")
    generator = torch.Generator().manual_seed(1)
    ckpt["network_weights"] = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                               for k, v in ckpt["network_weights"].items()}
    (copy / "fold_1").mkdir()
    torch.save(ckpt, copy / "fold_1" / "checkpoint_best.pth")
    data, props = _read(raw, "s3crop")
    predictor = _predictor(copy, folds=(0, 1), checkpoint_name="checkpoint_best.pth", use_mirroring=False)
    ref_seg, ref_probs = predictor.predict_single_npy_array(data, props, None, None, True)
    model = load_nnunet_model(copy, checkpoint_name="checkpoint_best.pth")
    assert model.folder.folds == [0, 1]
    labels, probs = predict_case(model, data, props["spacing"], use_mirroring=False, return_probabilities=True)
    agreement, dice = _agreement(labels, ref_seg, model.card.num_classes)
    assert agreement >= 0.999 and all(d >= 0.999 for d in dice.values()), (agreement, dice)
    assert np.abs(probs - ref_probs).max() < 1e-3


def test_segment_command_reproduces_nnunet(nnunet_model_folder, references, tmp_path):
    """``recokd segment FOLDER image out --mirror`` writes nnU-Net's labels on the input's exact grid."""
    from ReCoKDLib.cli import main
    from ReCoKDLib.data.io import read_image

    folder, raw = nnunet_model_folder
    image = raw / "imagesTs" / "s3aniso_0000.nii.gz"
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(folder), str(image), str(out), "--mirror", "--device", "cpu"]) == 0
    labels, geometry = read_image(out)
    _, input_geometry = read_image(image)
    assert geometry == input_geometry
    ref_seg = references["s3aniso"][2]
    assert (labels == ref_seg).mean() >= 0.999  # default backend (auto: may be OpenVINO/ORT fp32, other rounding)
    torch_out = tmp_path / "seg_torch.nii.gz"
    assert main(["segment", str(folder), str(image), str(torch_out), "--mirror", "--device", "cpu",
                 "--backend", "torch"]) == 0
    labels_api, _ = predict_file(folder, image, None, use_mirroring=True)
    # PyTorch: nnU-Net API's labels wherever the winning class is clear; a near-tie (top two probabilities
    # within 1e-3) may round either way (one voxel of 368,640 did on this model, once)
    data, props = _read(raw, "s3aniso")
    _, probs = predict_case(load_nnunet_model(folder), data, props["spacing"], use_mirroring=True,
                            return_probabilities=True)
    top_two = np.sort(probs, axis=0)[-2:]
    differ = labels_api != read_image(torch_out)[0]
    assert differ.mean() < 1e-4 and (top_two[1] - top_two[0])[differ].max(initial=0.0) < 1e-3


def test_folder_is_a_teacher_for_distillation(nnunet_model_folder):
    """``teachers.load_model(FOLDER)`` gives a teacher the engine accepts: card, taps, identity hash."""
    from ReCoKDLib.engine import _teacher_parts
    from ReCoKDLib.taps import probe_feature_shapes
    from ReCoKDLib.teachers import LoadedModel, load_model

    folder = nnunet_model_folder.model_folder
    model = load_model(folder)
    assert isinstance(model, LoadedModel) and model.kind == "nnunet" and model.feature_kd
    network, card, sha = _teacher_parts(str(folder))
    assert card.architecture["kind"] == "nnunet" and card.classes == ["background", "liver", "spleen"]
    assert len(sha) == 64 and sha == model.sha256
    shapes = probe_feature_shapes(network, card.tap_names, (1, *card.patch_size))
    assert [s[1] for s in shapes] == card.architecture["arch_kwargs"]["features_per_stage"][:-1]
