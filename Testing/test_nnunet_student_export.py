"""Students of an nnU-Net teacher, and their export as an nnU-Net v2 model folder that
``nnUNetPredictor`` runs unchanged (issue 9, items 1 and 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("dynamic_network_architectures")


@pytest.fixture(scope="module")
def nnunet_teacher(nnunet_model_folder):
    """``(model folder, raw dataset)`` of the session's tiny real nnU-Net model (conftest)."""
    return nnunet_model_folder.model_folder, nnunet_model_folder.raw_dataset


@pytest.fixture(scope="module")
def distilled_student(nnunet_teacher, tmp_path_factory):
    """A few ReCo-KD steps from the nnU-Net teacher on its raw dataset (widths / 2)."""
    from ReCoKDLib.data.layout import RawDataset
    from ReCoKDLib.data.preprocess import preprocess_case
    from ReCoKDLib.data.sampling import prepare_cases
    from ReCoKDLib.engine import TrainConfig, distill
    from ReCoKDLib.nnunet.teacher import load_nnunet_model

    folder, raw_root = nnunet_teacher
    teacher = load_nnunet_model(folder)
    raw = RawDataset.open(raw_root)
    case_set = prepare_cases(raw.training_cases()[:2], teacher.card.classes, preprocess_case,
                             {"spacing": teacher.card.spacing, "normalization": teacher.card.normalization},
                             label_spec=raw.label_spec)
    config = TrainConfig(patch_size=tuple(teacher.card.patch_size), batch_size=2, steps=3, num_val_cases=0,
                         device="cpu", student_reduction=2, min_channels=2, ema_decay=0.0,
                         augmentation={"enabled": False}, kd={"recokd": {"weight": 1.0}}, kd_warmup_steps=0)
    out = tmp_path_factory.mktemp("nnunet_student")
    result = distill(config, teacher, case_set, out)
    return teacher, result


def test_student_of_an_nnunet_teacher_is_its_plans_network_at_half_width(distilled_student):
    from ReCoKDLib.networks import count_parameters
    from ReCoKDLib.teachers import load_model

    teacher, result = distilled_student
    assert result.step == 3 and all(np.isfinite(h["total"]) for h in result.history["train"])
    student = load_model(result.last_model)
    arch, teacher_arch = student.card.architecture, teacher.card.architecture
    assert arch["kind"] == "nnunet" and arch["network_class_name"] == teacher_arch["network_class_name"]
    teacher_widths = teacher_arch["arch_kwargs"]["features_per_stage"]
    assert arch["arch_kwargs"]["features_per_stage"] == [max(c // 2, min(2, c)) for c in teacher_widths]
    assert {k: v for k, v in arch["arch_kwargs"].items() if k != "features_per_stage"} == \
        {k: v for k, v in teacher_arch["arch_kwargs"].items() if k != "features_per_stage"}
    assert student.card.tap_names == [f"encoder.stages.{i}" for i in range(len(teacher_widths) - 1)]
    assert student.card.kd["teacher_taps"] == teacher.card.tap_names
    assert count_parameters(student.network) < count_parameters(teacher.network) / 2.5
    context = student.card.provenance["nnunet"]
    assert context["plans"] == teacher.card.provenance["nnunet"]["plans"]
    assert context["dataset_name"] == "Dataset001_TinyCT" and context["configuration_name"] == "3d_tiny"
    # the loaded student segments: full-resolution logits of the card's classes
    x = torch.zeros(1, 1, *student.card.patch_size)
    with torch.no_grad():
        out = student.network(x)
    assert tuple(out.shape) == (1, len(teacher.card.classes), *student.card.patch_size)


def test_export_writes_a_minimal_nnunet_folder(distilled_student, tmp_path):
    from ReCoKDLib.nnunet.export import export_student

    _, result = distilled_student
    folder = export_student(result.last_model, tmp_path / "export")
    assert folder == tmp_path / "export" / "Dataset001_TinyCT" / "nnUNetTrainer__nnUNetPlans__3d_tiny_recokd"
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "fold_0", "plans.json", "recokd_model_card.json"]
    assert not [p for p in (tmp_path / "export").iterdir() if p.name.startswith(".")]  # no staging left
    plans = json.loads((folder / "plans.json").read_text())
    config = plans["configurations"]["3d_tiny_recokd"]
    assert "inherits_from" not in config and "3d_tiny" in plans["configurations"]
    assert config["architecture"]["arch_kwargs"]["features_per_stage"] == [2, 4, 8, 16]
    assert (config["UNet_class_name"], config["UNet_base_num_features"], config["unet_max_num_features"]) == \
        ("PlainConvUNet", 2, 16)  # legacy keys for nnU-Net <= 2.2: widths min(2 * 2**i, 16)
    for key in ("patch_size", "spacing", "normalization_schemes", "use_mask_for_norm", "preprocessor_name",
                "resampling_fn_data", "resampling_fn_probabilities_kwargs"):
        assert key in config
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)  # no allowlist needed
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["init_args"]["configuration"] == "3d_tiny_recokd"
    assert checkpoint["inference_allowed_mirroring_axes"] == (0, 1, 2)
    assert all(isinstance(v, torch.Tensor) for v in checkpoint["network_weights"].values())


def test_export_refuses_a_second_model_and_a_foreign_model_and_leaves_nothing(distilled_student, nnunet_teacher,
                                                                             tmp_path):
    from ReCoKDLib.checkpoint import save_model
    from ReCoKDLib.nnunet import NNUNetError
    from ReCoKDLib.nnunet.export import export_student
    from ReCoKDLib.teachers import load_model

    _, result = distilled_student
    root = tmp_path / "export"
    folder = export_student(result.last_model, root)
    with pytest.raises(NNUNetError, match="already exists"):
        export_student(result.last_model, root)
    assert export_student(result.last_model, root, overwrite=True) == folder
    with pytest.raises(NNUNetError, match="SlicerNNUnet uses the first dataset.json"):
        export_student(result.last_model, root, configuration_name="other")
    with pytest.raises(NNUNetError, match="already have a configuration '3d_tiny'"):
        export_student(result.last_model, tmp_path / "e2", configuration_name="3d_tiny")
    # a built-in U-Net student is not an nnU-Net model
    from ReCoKDLib.checkpoint import ModelCard
    from ReCoKDLib.networks import build_unet, preset

    net = build_unet(preset("tiny"))
    card = ModelCard({"kind": "dynunet", "config": preset("tiny").to_dict()}, ["background", "x"], [1, 1, 1],
                     {"scheme": "none"}, [16, 16, 16])
    plain = save_model(tmp_path / "plain.pt", net.state_dict(), card)
    with pytest.raises(NNUNetError, match="only students of nnU-Net teachers"):
        export_student(plain, tmp_path / "e3")
    # weights that do not fit the recorded architecture: refused after staging, nothing left behind
    student = load_model(result.last_model)
    bad_card = student.card
    bad_card.architecture = json.loads(json.dumps(bad_card.architecture))
    bad_card.architecture["arch_kwargs"]["features_per_stage"] = [4, 8, 16, 32]
    bad = save_model(tmp_path / "bad.pt", student.network.state_dict(), bad_card)
    with pytest.raises(NNUNetError, match="does not read back"):
        export_student(bad, tmp_path / "e4")
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e3").exists() and not (tmp_path / "e4").exists()


_PREDICT = textwrap.dedent('''
    import sys, torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    folder, image, out = sys.argv[1:4]
    torch.set_num_threads(1)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,  # SlicerNNUnet's default
                                device=torch.device("cpu"), perform_everything_on_device=False, verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    predictor.predict_from_files_sequential([[image]], [out], save_probabilities=False, overwrite=True,
                                            folder_with_segs_from_prev_stage=None)
''')


def test_nnunet_predictor_runs_the_export_and_agrees_with_recokd(distilled_student, nnunet_teacher, tmp_path):
    """nnU-Net's own predictor on the exported folder vs ReCoKD's nnU-Net-exact inference of the student
    (without test-time mirroring, as SlicerNNUnet runs it)."""
    pytest.importorskip("nnunetv2")
    from ReCoKDLib.data.io import read_image
    from ReCoKDLib.nnunet.export import export_student
    from ReCoKDLib.nnunet.predict import predict_file

    _, result = distilled_student
    _, raw_root = nnunet_teacher
    root = tmp_path / "export"
    folder = export_student(result.last_model, root)
    image = sorted((raw_root / "imagesTs").glob("*_0000.nii.gz"))[0]
    out_dir = tmp_path / "pred"
    out_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", nnUNet_results=str(root), nnUNet_raw=str(root),
               nnUNet_preprocessed=str(root))
    proc = subprocess.run([sys.executable, "-c", _PREDICT, str(folder), str(image), str(out_dir / "case")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs, their_geometry = read_image(out_dir / "case.nii.gz", allow_channels=False)
    ours, our_geometry = predict_file(folder, image, use_mirroring=False)
    assert theirs.shape == ours.shape and their_geometry.spacing == pytest.approx(our_geometry.spacing)
    agreement = float(np.mean(theirs == ours))
    assert agreement >= 0.999, agreement


def test_recokd_export_nnunet_command(distilled_student, tmp_path, capsys):
    from ReCoKDLib.cli import main

    _, result = distilled_student
    root = tmp_path / "cli"
    assert main(["export", "--nnunet", str(root), "--model", str(result.last_model), "--configuration",
                 "3d_student", "--progress", "none"]) == 0
    folder = root / "Dataset001_TinyCT" / "nnUNetTrainer__nnUNetPlans__3d_student"
    assert f"nnunet: {folder}" in capsys.readouterr().out
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    # again without --overwrite: bad input (exit 2), the first export intact
    assert main(["export", "--nnunet", str(root), "--model", str(result.last_model), "--configuration",
                 "3d_student", "--progress", "none"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (folder / "plans.json").is_file()
    assert main(["export", str(result.last_model), "--progress", "none"]) == 2  # neither --out nor --nnunet
    assert "--nnunet ROOT" in capsys.readouterr().err


def test_inspect_with_an_nnunet_folder_teacher(distilled_student, nnunet_teacher, tmp_path):
    """End to end with a model folder as the teacher: distil (fixture), then ``recokd inspect``
    writes the region masks and affinity maps on the image's exact grid."""
    from ReCoKDLib.cli import main
    from ReCoKDLib.data.io import read_image, same_grid
    from ReCoKDLib.data.layout import RawDataset

    teacher, result = distilled_student
    folder, raw_root = nnunet_teacher
    case = RawDataset.open(raw_root).training_cases()[0]
    image_path = case.image_paths[0]
    out = tmp_path / "inspect"
    assert main(["inspect", "--image", str(image_path), "--teacher", str(folder), "--student", str(result.last_model),
                 "--out", str(out), "--levels", "0", "--no-png", "--device", "cpu", "--progress", "none"]) == 0
    image, geometry = read_image(image_path)
    volumes = sorted(out.rglob("*.nrrd"))
    names = {v.name for v in volumes}
    assert {"affinity_teacher.nrrd", "affinity_student.nrrd", "affinity_difference.nrrd", "segmentation.nrrd",
            "region_01_liver.nrrd"} <= names, names
    for volume in volumes:
        array, g = read_image(volume)
        assert same_grid(g, geometry, array.shape, image.shape), volume
