"""nnU-Net region-based labels and the ignore label end to end: teacher training (sigmoid heads),
inference painted in ``regions_class_order``, distillation with ReCo-KD + binary logit KD, and
validation / evaluation Dice that never count ignored voxels."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

# the Dataset950_RegionsIgnore writer (regions organs = [1, 2], liver = 1, order [2, 1], ignore 3)
from test_nnunet_labels import _spacing, region_ignore_dataset  # noqa: F401  (a fixture)

from ReCoKDLib.nnunet.labels import IGNORED, label_spec_from_card, parse_labels, regions_to_segmentation

REGION_SPEC = parse_labels({"background": 0, "organs": [1, 2], "liver": 1, "ignore": 3}, [2, 1])


def _config(**changes):
    from ReCoKDLib.engine import TrainConfig
    from ReCoKDLib.networks import preset

    base = dict(patch_size=(16, 32, 32), batch_size=2, steps=2, num_val_cases=1, val_every=2, device="cpu",
                network=preset("tiny").to_dict(), ema_decay=0.0, oversample_foreground=1.0,
                augmentation={"enabled": False}, log_every=1, checkpoint_every=100)
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def region_cases(region_ignore_dataset):  # noqa: F811
    from ReCoKDLib.data.layout import RawDataset
    from ReCoKDLib.data.preprocess import preprocess_case
    from ReCoKDLib.data.sampling import prepare_cases

    root, _ = region_ignore_dataset
    ds = RawDataset.open(root)
    return prepare_cases(ds.training_cases(), ds.class_names, preprocess_case,
                         {"spacing": _spacing(root), "normalization": {"scheme": "zscore"}}, label_spec=ds.label_spec)


@pytest.fixture(scope="module")
def region_teacher(region_cases, tmp_path_factory):
    from ReCoKDLib.engine import train_teacher

    return train_teacher(_config(), region_cases, tmp_path_factory.mktemp("region_teacher"))


# -- teacher training and inference ---------------------------------------------------------------


def test_region_teacher_has_one_sigmoid_head_per_region_and_records_the_spec(region_teacher, region_cases):
    from ReCoKDLib.checkpoint import load_model_file

    assert region_teacher.step == 2 and all(np.isfinite(h["seg"]) for h in region_teacher.history["train"])
    card, state = load_model_file(region_teacher.last_model)
    assert label_spec_from_card(card) == region_cases.label_spec  # head order survives the sorted card JSON
    assert card.label_spec["regions_class_order"] == [2, 1]
    assert card.architecture["config"]["num_classes"] == 2  # heads organs, liver (not 3 label values)
    assert card.classes == ["background", "liver", "label_2"]  # names of the painted label values
    # validation is per region, keyed by the region names
    assert set(region_teacher.metrics["dice"]) == {"organs", "liver"}


def test_region_teacher_segments_a_volume_into_labels_in_region_order(region_teacher, tiny_ct_case):
    from ReCoKDLib.data.io import read_image
    from ReCoKDLib.infer import segment_volume
    from ReCoKDLib.teachers import load_model

    model = load_model(region_teacher.last_model, "cpu")
    image, geometry = read_image(tiny_ct_case.image_paths[0], allow_channels=False)
    result = segment_volume(model, image, geometry, device="cpu", return_probabilities=True)
    assert result.probabilities.shape == (2, *image.shape)  # sigmoid per region, not a softmax
    assert np.all((result.probabilities >= 0) & (result.probabilities <= 1))
    assert set(np.unique(result.labels).tolist()) <= {0, 1, 2}
    np.testing.assert_array_equal(result.labels, regions_to_segmentation(result.probabilities, [2, 1]))


class _Thresholds(nn.Module):
    """Region logits from intensity: region 0 where x > 1, region 1 where x > 2 (nested regions)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        return torch.cat([self.scale * (x - 1.0), self.scale * (x - 2.0)], dim=1)


@pytest.mark.parametrize("order, inner, outer", [([2, 1], 1, 2), ([1, 2], 2, 1)])
def test_segment_volume_paints_regions_in_regions_class_order(order, inner, outer):
    """Where both regions are on, the later region of ``regions_class_order`` wins."""
    from ReCoKDLib.checkpoint import ModelCard
    from ReCoKDLib.data.io import Geometry
    from ReCoKDLib.infer import segment_volume

    image = np.full((8, 8, 8), 0.5, np.float32)
    image[2:6, 2:6, 2:6] = 1.5  # region 0 only
    image[3:5, 3:5, 3:5] = 2.5  # both regions
    spec = parse_labels({"background": 0, "a": [1, 2], "b": 2}, order)
    card = ModelCard(architecture={"kind": "test"}, classes=["background", "x", "y"], spacing=[1.0, 1.0, 1.0],
                     normalization={"scheme": "none"}, patch_size=[8, 8, 8], label_spec=spec.to_dict())
    model = types.SimpleNamespace(network=_Thresholds(), card=card, kind="test")
    result = segment_volume(model, image, Geometry(spacing=(1.0, 1.0, 1.0)), device="cpu", overlap=0.0)
    assert result.labels[0, 0, 0] == 0
    assert result.labels[2, 2, 2] == outer and result.labels[4, 4, 4] == inner


# -- distillation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def region_student(region_teacher, region_cases, tmp_path_factory):
    from ReCoKDLib.engine import distill

    config = _config(kd={"recokd": {"weight": 1.0}, "logit": {"weight": 1.0}}, kd_weight=1.0, kd_warmup_steps=0,
                     student_reduction=2, min_channels=4)
    return distill(config, region_teacher.last_model, region_cases, tmp_path_factory.mktemp("region_student"))


def test_region_student_distils_with_recokd_and_binary_logit_kd(region_student, region_cases):
    from ReCoKDLib.checkpoint import load_model_file

    result = region_student
    assert result.step == 2
    for record in result.history["train"]:
        assert np.isfinite(record["kd"]) and record["kd"] > 0 and np.isfinite(record["logit"])
        assert record["recokd/fg"] > 0  # MS-SARD's foreground term: region masks were built from the region maps
    card, _ = load_model_file(result.last_model)
    assert label_spec_from_card(card) == region_cases.label_spec and card.role == "student"
    assert card.architecture["config"]["num_classes"] == 2
    assert set(result.metrics["dice"]) == {"organs", "liver"}


def test_inspection_of_a_region_pair_builds_one_mask_per_region(region_teacher, region_student, region_ignore_dataset):  # noqa: F811
    from ReCoKDLib.data.io import read_image
    from ReCoKDLib.inspection import inspect_volume
    from ReCoKDLib.teachers import load_model

    root, _ = region_ignore_dataset
    image, geometry = read_image(root / "imagesTr" / "ct_a_0000.nii.gz", allow_channels=False)
    label, _ = read_image(root / "labelsTr" / "ct_a.nii.gz", allow_channels=False)
    teacher, student = load_model(region_teacher.last_model, "cpu"), load_model(region_student.last_model, "cpu")
    maps = inspect_volume(teacher, student, image, geometry, labels=label, method="recokd")
    classes = sorted(k.rsplit("/", 1)[1] for k in maps if k.startswith("0/class_mask/"))
    assert classes == ["0", "1", "2"]  # background + the regions organs and liver
    ignored = label == 3
    for cls in classes:
        assert float(np.abs(maps[f"0/class_mask/{cls}"][ignored]).max()) == 0.0  # ignored voxels in no mask
    organs, liver = maps["0/class_mask/1"] > 0, maps["0/class_mask/2"] > 0
    assert organs.any() and liver.any() and np.all(organs[liver])  # liver is inside the organs region


def test_distillation_refuses_a_region_teacher_on_a_class_dataset(region_teacher, region_cases, tmp_path):
    import dataclasses

    from ReCoKDLib.engine import TrainingError, distill

    plain = dataclasses.replace(region_cases, label_spec=parse_labels(
        {"background": 0, "liver": 1, "other": 2, "ignore": 3}))
    with pytest.raises(TrainingError, match=r"teacher's outputs are regions .* labels are classes"):
        distill(_config(), region_teacher.last_model, plain, tmp_path / "refused")
    assert not (tmp_path / "refused" / "model_last.pt").exists()


def test_binary_logit_kd_is_the_per_region_bernoulli_kl():
    from ReCoKDLib.losses.base import KDBatch
    from ReCoKDLib.losses.baselines import LogitKDLoss, binary_logit_kd, logit_kd

    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    loss, per_voxel = binary_logit_kd(s, t, 2.0)
    p, q = torch.sigmoid(t / 2), torch.sigmoid(s / 2)
    reference = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(1, keepdim=True) * 4.0
    assert torch.allclose(per_voxel, reference, atol=1e-5) and per_voxel.shape == (2, 1, 4, 4, 4)
    assert float(binary_logit_kd(t, t, 2.0)[0]) == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(binary_logit_kd(s * 1e4, t * 1e4, 1.0)[0])  # saturated heads stay finite
    # the loss picks the binary form when the batch holds regions, the softmax form otherwise
    kd = LogitKDLoss(temperature=2.0)
    assert torch.allclose(kd(KDBatch(teacher_logits=t, student_logits=s, regions=True)).loss, loss)
    assert torch.allclose(kd(KDBatch(teacher_logits=t, student_logits=s)).loss, logit_kd(s, t, 2.0)[0])


def test_region_pseudo_labels_are_painted_teacher_regions():
    from ReCoKDLib.data.sampling import UNLABELLED
    from ReCoKDLib.engine import merge_region_pseudo_labels

    logits = torch.tensor([[5.0, 5.0, -5.0], [5.0, -5.0, -5.0]]).view(1, 2, 3, 1, 1).repeat(2, 1, 1, 1, 1)
    labels = torch.tensor([[0, 2, 1], [UNLABELLED] * 3]).view(2, 1, 3, 1, 1)
    merged, unlabelled = merge_region_pseudo_labels(labels, logits, [2, 1])
    assert unlabelled.tolist() == [False, True]
    assert merged[0].flatten().tolist() == [0, 2, 1]  # real labels kept
    assert merged[1].flatten().tolist() == [1, 2, 0]  # both regions -> 1 (last in order), region 0 only -> 2


# -- validation and evaluation ignore ignored voxels ----------------------------------------------


class _Fixed(nn.Module):
    """Returns stored logits ``(1, K, D, H, W)`` whatever the input (one window covers the volume)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1, -1, -1, -1) + self.anchor


def _case_set(label: np.ndarray, spec):
    from ReCoKDLib.data.sampling import CaseArrays, CaseSet

    case = CaseArrays("c", np.zeros((1, *label.shape), np.float32), label[None].astype(np.int16))
    return CaseSet([case], ["background", "liver", "other"], label_spec=spec)


def _label_with_ignored():
    label = np.zeros((8, 8, 8), np.int16)
    label[2:6, 2:6, 2:6] = 2
    label[3:5, 3:5, 3:5] = 1
    label[:, :, 7] = IGNORED
    return label


@pytest.mark.parametrize("regions", [False, True])
def test_validation_dice_ignores_predictions_on_ignored_voxels(regions):
    from ReCoKDLib.engine import validate

    label = _label_with_ignored()
    wrong = label.copy()
    wrong[label == IGNORED] = 1  # the prediction is wrong only where the label is ignored
    if regions:
        spec = REGION_SPEC
        maps = np.stack([np.isin(wrong, v) for v in spec.regions]).astype(np.float32)
        logits = torch.from_numpy(np.where(maps > 0, 10.0, -10.0)).float()[None]
    else:
        spec = parse_labels({"background": 0, "liver": 1, "other": 2, "ignore": 3})
        logits = torch.nn.functional.one_hot(torch.from_numpy(wrong).long(), 3).permute(3, 0, 1, 2)[None] * 10.0
    metrics = validate(_Fixed(logits.float()), _case_set(label, spec), (8, 8, 8), torch.device("cpu"), None)
    assert metrics["mean_dice"] == pytest.approx(1.0)
    assert set(metrics["dice"]) == ({"organs", "liver"} if regions else {"liver", "other"})
    # the same error on a voxel that is not ignored lowers the Dice
    wrong_label = label.copy()
    wrong_label[label == IGNORED] = 0
    metrics = validate(_Fixed(logits.float()), _case_set(wrong_label, spec), (8, 8, 8), torch.device("cpu"), None)
    assert metrics["mean_dice"] < 1.0


def test_evaluation_dice_ignores_ignored_voxels():
    from ReCoKDLib.evaluate import _ignored_voxels, dice_hd95

    reference = np.abs(_label_with_ignored()).astype(np.int16)
    reference[:, :, 7] = 3  # the raw ignore label, as a label file holds it
    prediction = np.where(reference == 3, 1, reference)
    card = types.SimpleNamespace(label_spec=REGION_SPEC.to_dict(), provenance={})
    ignored = _ignored_voxels(card, reference)
    assert int(ignored.sum()) == 64
    dice, _ = dice_hd95(prediction, np.where(ignored, 0, reference), 3, ignored=ignored)
    assert dice == pytest.approx([1.0, 1.0])
    dice, _ = dice_hd95(prediction, np.where(ignored, 0, reference), 3)
    assert dice[0] < 1.0
