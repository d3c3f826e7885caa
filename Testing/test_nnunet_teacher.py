"""nnU-Net v2 model folders as teachers: safe loading, plans -> network, bad input, nnU-Net's numerics.

Small synthetic model folders (plans/dataset.json/checkpoints written here, weights of a DNA net
built from the plans) keep these tests fast and independent of nnunetv2; where nnunetv2 is
installed, its own functions are the reference for window placement, Gaussian and resampling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dynamic_network_architectures")

from ReCoKDLib.nnunet import NNUNetError, describe_model_folder, is_model_folder  # noqa: E402
from ReCoKDLib.nnunet.checkpoint import load_nnunet_checkpoint  # noqa: E402
from ReCoKDLib.nnunet.folder import label_info, open_model_folder, resolve_configuration  # noqa: E402
from ReCoKDLib.nnunet.network import (  # noqa: E402
    architecture_record, build_from_record, build_network, encoder_tap_names)
from ReCoKDLib.nnunet.predict import gaussian_importance, sliding_window_logits, window_starts  # noqa: E402
from ReCoKDLib.nnunet.preprocess import resample_to_shape  # noqa: E402
from ReCoKDLib.nnunet.teacher import FoldEnsemble, load_nnunet_model  # noqa: E402

torch.set_num_threads(1)
CONFIG = "3d_tiny"
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
                "numTraining": 5, "file_ending": ".nii.gz"}


def _architecture(features=(4, 8, 16)):
    n = len(features)
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def make_plans(features=(4, 8, 16)) -> dict:
    full = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [16, 16, 16], "spacing": [3.0, 3.0, 3.0], "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": _architecture((8, 16, 32, 64)),
    }
    return {"dataset_name": "Dataset001_TinyCT", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "image_reader_writer": "SimpleITKIO",
            "foreground_intensity_properties_per_channel": {"0": {
                "mean": 44.4, "std": 16.3, "percentile_00_5": -23.0, "percentile_99_5": 80.0}},
            "configurations": {"3d_fullres": full, CONFIG: {"inherits_from": "3d_fullres", "patch_size": [16, 16, 16],
                                                            "architecture": _architecture(features)}}}


def write_checkpoint(path: Path, network: torch.nn.Module, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
               "init_args": {"configuration": CONFIG, "fold": 0, "device": torch.device("cpu")},
               "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 3,
               "logging": {"mean_fg_dice": [np.float32(0.5), np.float32(0.6)]}, "_best_ema": np.float32(0.6)}
    payload.update(extra)
    torch.save(payload, path)
    return path


def make_folder(root: Path, folds=(0,), features=(4, 8, 16), trainer="nnUNetTrainer", seed=0) -> Path:
    folder = root / "Dataset001_TinyCT" / f"{trainer}__nnUNetPlans__{CONFIG}"
    folder.mkdir(parents=True)
    plans = make_plans(features)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    for n, fold in enumerate(folds):
        torch.manual_seed(seed + n)
        net = build_network(plans, DATASET_JSON, CONFIG)
        write_checkpoint(folder / f"fold_{fold}" / "checkpoint_final.pth", net)
    return folder


# ------------------------------------------------------------------------------------------------
# Safe loading


def test_checkpoint_with_numpy_scalars_loads_only_with_the_allowlist(tmp_path):
    folder = make_folder(tmp_path)
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(Exception):
        torch.load(ckpt, weights_only=True)  # plain weights_only refuses numpy scalars: the allowlist is needed
    payload = load_nnunet_checkpoint(ckpt)
    assert payload["trainer_name"] == "nnUNetTrainer"
    assert payload["_best_ema"] == np.float32(0.6)
    assert payload["init_args"]["device"] == torch.device("cpu")


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_code_payload_is_refused_and_nothing_runs(tmp_path):
    from ReCoKDLib.teachers import load_model

    folder = make_folder(tmp_path)
    marker = tmp_path / "pwned.txt"
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "trainer_name": "nnUNetTrainer", "evil": _Payload(str(marker))}, ckpt)
    for loader in (load_nnunet_checkpoint, lambda p: load_nnunet_model(folder), lambda p: load_model(folder)):
        with pytest.raises(NNUNetError, match="outside the nnU-Net allowlist") as info:
            loader(ckpt)
        assert str(ckpt) in str(info.value)
        assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# The folder, plans and labels


def test_open_model_folder_resolves_inheritance_and_folds(tmp_path):
    folder = make_folder(tmp_path, folds=(0, 1, "all"))
    opened = open_model_folder(folder)
    assert opened.folds == [0, 1]  # numbered folds by default, as nnUNetPredictor
    assert (opened.trainer_name, opened.plans_name, opened.configuration_name) == ("nnUNetTrainer", "nnUNetPlans", CONFIG)
    assert opened.configuration["spacing"] == [3.0, 3.0, 3.0]  # inherited from 3d_fullres
    assert opened.configuration["architecture"]["arch_kwargs"]["features_per_stage"] == [4, 8, 16]  # own
    assert "inherits_from" not in opened.configuration
    assert open_model_folder(folder, folds="all").checkpoint_paths == [folder / "fold_all" / "checkpoint_final.pth"]
    assert is_model_folder(folder) and not is_model_folder(tmp_path)
    assert describe_model_folder(folder) == \
        f"nnU-Net {CONFIG}: 2 classes (liver, spleen); spacing 3 x 3 x 3 mm; folds 0, 1, all"


def test_resolve_configuration_errors():
    plans = make_plans()
    plans["configurations"]["loop_a"] = {"inherits_from": "loop_b"}
    plans["configurations"]["loop_b"] = {"inherits_from": "loop_a"}
    with pytest.raises(NNUNetError, match="cycle"):
        resolve_configuration(plans, "loop_a")
    with pytest.raises(NNUNetError, match="no configuration '2d'.*3d_fullres"):
        resolve_configuration(plans, "2d")


def test_label_info_classes_regions_and_ignore():
    info = label_info(DATASET_JSON)
    assert (info.class_names, info.num_heads, info.has_regions, info.ignore_label) == \
        (["background", "liver", "spleen"], 3, False, None)
    regions = label_info({"labels": {"background": 0, "spheres": [1, 2], "sphereB": 2, "ignore": 3},
                          "regions_class_order": [1, 2]})
    assert regions.has_regions and regions.num_heads == 2 and regions.ignore_label == 3
    assert regions.regions == [(1, 2), (2,)] and regions.regions_class_order == [1, 2]
    with pytest.raises(NNUNetError, match="regions_class_order"):
        label_info({"labels": {"background": 0, "spheres": [1, 2], "sphereB": 2}})
    with pytest.raises(NNUNetError, match="consecutive"):
        label_info({"labels": {"background": 0, "a": 1, "b": 3}})


@pytest.mark.parametrize("remove, expected", [
    ("plans.json", "plans.json is missing"),
    ("dataset.json", "dataset.json is missing"),
    ("fold_0/checkpoint_final.pth", "holds no fold_"),
])
def test_folder_missing_parts(tmp_path, remove, expected):
    folder = make_folder(tmp_path)
    (folder / remove).unlink()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(NNUNetError, match=expected) as info:
        load_nnunet_model(folder)
    assert str(folder) in str(info.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written


def test_missing_fold_names_the_file_and_the_folds_there_are(tmp_path):
    folder = make_folder(tmp_path, folds=(0,))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(NNUNetError) as info:
        load_nnunet_model(folder, folds=[0, 3])
    assert str(folder / "fold_3" / "checkpoint_final.pth") in str(info.value) and "[0]" in str(info.value)
    with pytest.raises(NNUNetError, match="checkpoint_best.pth"):
        load_nnunet_model(folder, checkpoint_name="checkpoint_best.pth")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_checkpoint_from_other_plans_is_a_shape_mismatch(tmp_path):
    folder = make_folder(tmp_path, features=(4, 8, 16))
    other = build_network(make_plans((8, 16, 32)), DATASET_JSON, CONFIG)
    write_checkpoint(folder / "fold_0" / "checkpoint_final.pth", other)
    with pytest.raises(NNUNetError) as info:
        load_nnunet_model(folder)
    message = str(info.value)
    assert "fold_0/checkpoint_final.pth" in message and "do not fit" in message and "plans.json" in message


@pytest.mark.parametrize("class_name, expected", [
    ("my_package.nets.FancyNet", "FancyNet"),
    ("dynamic_network_architectures.architectures.primus.Primus", "Primus"),
])
def test_unknown_network_class_is_refused(tmp_path, class_name, expected):
    folder = make_folder(tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"][CONFIG]["architecture"]["network_class_name"] = class_name
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(NNUNetError, match=expected) as info:
        load_nnunet_model(folder)
    assert "plans.json" in str(info.value) and "PlainConvUNet" in str(info.value)


def test_op_names_outside_torch_nn_are_refused():
    plans = make_plans()
    plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"
    with pytest.raises(NNUNetError, match="os.system"):
        build_network(plans, DATASET_JSON, CONFIG)


# ------------------------------------------------------------------------------------------------
# Networks from plans


def test_network_record_rebuilds_through_teachers_build_network():
    from ReCoKDLib.teachers import build_network as teachers_build_network

    plans = make_plans()
    record = json.loads(json.dumps(architecture_record(plans, DATASET_JSON, CONFIG)))  # JSON-serialisable
    assert record["kind"] == "nnunet" and record["num_classes"] == 3 and record["input_channels"] == 1
    torch.manual_seed(0)
    a = build_network(plans, DATASET_JSON, CONFIG)
    b = teachers_build_network(record)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
    assert encoder_tap_names(record) == encoder_tap_names(a) == ["encoder.stages.0", "encoder.stages.1"]
    student = build_network(plans, DATASET_JSON, CONFIG, features_per_stage=[2, 4, 8], deep_supervision=True)
    outputs = student(x)
    assert isinstance(outputs, (list, tuple)) and outputs[0].shape == (1, 3, 16, 16, 16)


def test_bn_trainer_and_legacy_plans():
    plans = make_plans()
    bn = build_network(plans, DATASET_JSON, CONFIG, trainer_name="nnUNetTrainerBN")
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in bn.modules())
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in bn.modules())
    with pytest.raises(NNUNetError, match="Primus"):
        build_network(plans, DATASET_JSON, CONFIG, trainer_name="nnUNetTrainer_Primus_M")

    legacy = {"UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 4, "unet_max_num_features": 16,
              "n_conv_per_stage_encoder": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2],
              "conv_kernel_sizes": [[3, 3, 3]] * 3, "pool_op_kernel_sizes": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
              "num_pool_per_axis": [2, 2, 2], "patch_size": [16, 16, 16]}
    old_plans = {"configurations": {"3d_fullres": legacy}}
    old = build_network(old_plans, DATASET_JSON, "3d_fullres")
    new = build_network(plans, DATASET_JSON, CONFIG)
    assert [tuple(v.shape) for v in old.state_dict().values()] == [tuple(v.shape) for v in new.state_dict().values()]


def test_several_folds_average_their_logits(tmp_path):
    folder = make_folder(tmp_path, folds=(0, 1))
    model = load_nnunet_model(folder)
    assert isinstance(model.network, FoldEnsemble) and len(model.fold_networks) == 2
    assert model.card.tap_names == ["folds.0.encoder.stages.0", "folds.0.encoder.stages.1"]
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = (model.fold_networks[0](x) + model.fold_networks[1](x)) / 2
        assert torch.allclose(model.network(x), expected)
    card = model.card
    assert card.classes == ["background", "liver", "spleen"] and card.spacing == [3.0, 3.0, 3.0]
    assert card.normalization["scheme"] == "ct" and card.normalization["clip"] == [-23.0, 80.0]
    assert model.mirror_axes == (0, 1, 2) and card.provenance["nnunet"]["folds"] == [0, 1]


# ------------------------------------------------------------------------------------------------
# nnU-Net's numerics (reference: nnunetv2's own functions)


def test_window_placement_and_gaussian_match_nnunet():
    sw = pytest.importorskip("nnunetv2.inference.sliding_window_prediction")
    for size in (32, 33, 45, 61, 77, 130):
        assert window_starts(size, 32, 0.5) == sw.compute_steps_for_sliding_window((size,), (32,), 0.5)[0]
        assert window_starts(size, 32, 0.3) == sw.compute_steps_for_sliding_window((size,), (32,), 0.3)[0]
    ours = gaussian_importance((16, 20, 24))
    ref = sw.compute_gaussian((16, 20, 24), sigma_scale=1. / 8, value_scaling_factor=10, device=torch.device("cpu"))
    assert ours.dtype == torch.float16 and torch.equal(ours, ref)


@pytest.mark.parametrize("shape, new_shape, spacing, new_spacing", [
    ((1, 13, 20, 17), (9, 25, 30), (3.0, 3.0, 3.0), (4.0, 2.4, 1.7)),          # 3D splines
    ((2, 7, 30, 30), (19, 22, 22), (5.0, 0.8, 0.8), (1.8, 1.1, 1.1)),          # separate z (current spacing)
    ((1, 20, 16, 16), (10, 16, 16), (1.0, 1.0, 1.0), (2.0, 1.0, 1.0)),         # only z changes
])
def test_resampling_matches_nnunet(shape, new_shape, spacing, new_spacing):
    ref = pytest.importorskip("nnunetv2.preprocessing.resampling.default_resampling")
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    for order in (3, 1):
        expected = ref.resample_data_or_seg_to_shape(data, new_shape, spacing, new_spacing, is_seg=False, order=order,
                                                     order_z=0, force_separate_z=None)
        ours = resample_to_shape(data, new_shape, spacing, new_spacing, order=order, order_z=0)
        assert ours.dtype == expected.dtype and np.array_equal(ours, expected)


def test_sliding_window_pads_small_volumes_and_mirrors():
    plans = make_plans()
    torch.manual_seed(0)
    net = build_network(plans, DATASET_JSON, CONFIG).eval()
    data = torch.randn(1, 10, 20, 16)  # smaller than the patch along D: centred zero padding
    logits = sliding_window_logits(net, data, (16, 16, 16), mirror_axes=(0, 1, 2))
    assert logits.shape == (3, 10, 20, 16) and logits.dtype == torch.float16
    plain = sliding_window_logits(net, data, (16, 16, 16))
    assert not torch.equal(logits, plain)
    with pytest.raises(NNUNetError, match="mirror axes"):
        sliding_window_logits(net, data, (16, 16, 16), mirror_axes=(3,))


def test_library_paths_import_neither_nnunetv2_nor_need_dna(tmp_path):
    folder = make_folder(tmp_path)
    code = (
        "import sys\n"
        "from ReCoKDLib.teachers import load_model\n"
        f"m = load_model({str(folder)!r})\n"
        "assert m.kind == 'nnunet'\n"
        "assert 'nnunetv2' not in sys.modules and 'timm' not in sys.modules and 'torchvision' not in sys.modules\n"
        "sys.modules['dynamic_network_architectures'] = None\n"
        "from ReCoKDLib.nnunet import NNUNetError\n"
        "from ReCoKDLib.nnunet.network import build_from_record\n"
        "try:\n"
        "    build_from_record(m.card.architecture)\n"
        "except NNUNetError as exc:\n"
        "    assert 'nnunet' in str(exc) and 'extra' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('no error without DNA')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
