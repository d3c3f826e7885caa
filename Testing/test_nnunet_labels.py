"""nnU-Net label semantics: region-based labels and the ignore label, in data, losses and KD masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ReCoKDLib.nnunet.labels import (
    IGNORED,
    DeepSupervisionSegLoss,
    LabelSpecError,
    SegmentationLoss,
    label_spec_from_dataset_json,
    labels_to_regions,
    mark_ignored,
    parse_labels,
    regions_to_segmentation,
)

REGION_LABELS = {"background": 0, "spheres": [1, 2], "sphereB": 2, "ignore": 3}


# -- parsing -------------------------------------------------------------------------------------


def test_plain_labels_with_ignore():
    spec = parse_labels({"background": 0, "liver": 1, "spleen": 2, "ignore": 3})
    assert not spec.has_regions and spec.ignore_label == 3
    assert spec.head_names == ["background", "liver", "spleen"] and spec.num_heads == 3
    assert spec.value_names == ["background", "liver", "spleen"]


def test_region_labels_as_nnunet_label_manager():
    """The verified region dataset of nnunet-interop §6: heads = foreground regions, no ignore head."""
    spec = parse_labels(REGION_LABELS, [1, 2])
    assert spec.has_regions and spec.ignore_label == 3
    assert spec.regions == [(1, 2), (2,)]
    assert spec.head_names == ["spheres", "sphereB"] and spec.num_heads == 2
    assert spec.value_names == ["background", "label_1", "sphereB"]
    assert spec.to_dict() == {"labels": REGION_LABELS, "regions_class_order": [1, 2]}


@pytest.mark.parametrize("labels, order, message", [
    ({"liver": 1, "spleen": 2}, None, "background label with value 0"),
    ({"background": 0, "liver": 2}, None, "consecutive"),
    ({"background": 0, "liver": 1, "ignore": 1}, None, "must be higher"),
    ({"background": 0, "a": [1, 2], "b": 2}, None, "need 'regions_class_order'"),
    ({"background": 0, "a": [1, 2], "b": 2}, [1], "2 foreground regions"),
    ({"background": 0, "a": [0, 1]}, [1], "may not contain the background"),
    ({"background": 0, "a": "one"}, None, "must be an integer"),
    ({"background": 0, "a": 1, "b": 1}, None, "share one value"),
])
def test_bad_labels_are_refused_with_the_reason(labels, order, message):
    with pytest.raises(LabelSpecError, match=message):
        parse_labels(labels, order)


def test_spec_from_dataset_json_requires_labels():
    with pytest.raises(LabelSpecError, match="'labels'"):
        label_spec_from_dataset_json({"channel_names": {"0": "CT"}})


# -- label maps ----------------------------------------------------------------------------------


def test_mark_ignored_numpy_and_torch():
    label = np.array([[[0, 1, 3, 2]]], dtype=np.uint8)
    out = mark_ignored(label, 3)
    assert out.dtype == np.int16 and out.tolist() == [[[0, 1, IGNORED, 2]]]
    assert label.tolist() == [[[0, 1, 3, 2]]]  # input untouched
    t = mark_ignored(torch.tensor([0.0, 3.0, 1.0]), 3)
    assert t.dtype == torch.int64 and t.tolist() == [0, IGNORED, 1]
    assert mark_ignored(label, None).tolist() == label.tolist()


def test_labels_to_regions_and_back():
    ids = torch.tensor([0, 1, 2, IGNORED]).view(1, 1, 4, 1, 1)
    maps = labels_to_regions(ids, [(1, 2), (2,)])
    assert maps[0, :, :, 0, 0].tolist() == [[0, 1, 1, IGNORED], [0, 0, 1, IGNORED]]
    # regions painted in regions_class_order: value 2 overwrites value 1 where both regions are on
    seg = regions_to_segmentation(maps[0].clamp(min=0), [1, 2])
    assert seg.dtype == np.uint8 and seg[:, 0, 0].tolist() == [0, 1, 2, 0]
    with pytest.raises(LabelSpecError, match="R = 3 regions"):
        regions_to_segmentation(maps[0], [1, 2, 3])


# -- losses --------------------------------------------------------------------------------------


def test_segmentation_loss_does_not_see_ignored_voxels():
    """Changing the logits of ignored voxels changes neither loss nor gradient elsewhere."""
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4))
    labels[:, :, :2] = IGNORED
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    loss_fn = SegmentationLoss()
    loss = loss_fn(logits, labels)
    loss.backward()
    assert torch.all(logits.grad[:, :, :2] == 0) and logits.grad[:, :, 2:].abs().sum() > 0
    changed = logits.detach().clone()
    changed[:, :, :2] = 100.0 * torch.randn(2, 3, 2, 4, 4)
    assert torch.allclose(loss_fn(changed, labels), loss.detach())
    # everything ignored: zero loss, still differentiable
    empty = loss_fn(logits, torch.full_like(labels, IGNORED))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_segmentation_loss_matches_monai_dice_ce_without_ignored_voxels():
    from monai.losses import DiceCELoss

    torch.manual_seed(1)
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4))
    logits = torch.randn(2, 3, 4, 4, 4)
    reference = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                           smooth_nr=1e-5, smooth_dr=1e-5)(logits, labels)
    assert torch.allclose(SegmentationLoss()(logits, labels), reference, atol=1e-5)


def test_region_loss_prefers_correct_sigmoid_outputs_and_skips_ignored():
    labels = torch.tensor([0, 1, 2, IGNORED]).view(1, 1, 4, 1, 1).repeat(1, 1, 1, 2, 2)
    regions = [(1, 2), (2,)]
    target = labels_to_regions(labels, regions)
    good = torch.where(target > 0, 8.0, -8.0)
    bad = -good
    loss_fn = SegmentationLoss(regions)
    assert float(loss_fn(good, labels)) < 0.01 < float(loss_fn(bad, labels))
    flipped_ignored = good.clone()
    flipped_ignored[:, :, 3] *= -1  # wrong only where ignored
    assert torch.allclose(loss_fn(flipped_ignored, labels), loss_fn(good, labels))
    with pytest.raises(LabelSpecError, match="2 regions"):
        loss_fn(torch.zeros(1, 3, 4, 2, 2), labels)


def test_deep_supervision_loss_resizes_labels_to_each_head():
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    labels[:, :, 4:] = 1
    labels[:, :, :, :2] = IGNORED
    full = torch.where(labels == 1, 5.0, -5.0).float().repeat(1, 2, 1, 1, 1)
    full[:, 0] *= -1
    half = full[:, :, ::2, ::2, ::2].clone()
    loss = DeepSupervisionSegLoss(2)([full, half], labels)
    assert float(loss) < 0.05
    assert DeepSupervisionSegLoss(2).weights == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(LabelSpecError, match="3 outputs"):
        DeepSupervisionSegLoss(2)([full, half, half], labels)


def test_kd_region_masks_exclude_ignored_voxels_for_class_ids_and_region_maps():
    from ReCoKDLib.losses.masks import class_balanced_region_masks

    labels = torch.tensor([0, 0, 1, 2, IGNORED, IGNORED]).view(1, 1, 6, 1, 1)
    fg, bg = class_balanced_region_masks(labels, num_classes=3)
    assert fg[0, 0, 4:].abs().sum() == 0 and bg[0, 0, 4:].abs().sum() == 0
    assert float(bg.sum()) == pytest.approx(1.0)
    maps = labels_to_regions(labels, [(1, 2), (2,)])
    fg_r, bg_r = class_balanced_region_masks(maps, num_classes=3, regions=True)
    assert fg_r[0, 0, 4:].abs().sum() == 0 and bg_r[0, 0, 4:].abs().sum() == 0
    assert float(bg_r.sum()) == pytest.approx(1.0) and float(bg_r[0, 0, 0]) == pytest.approx(0.5)


# -- raw datasets with regions and an ignore label (a real CT crop) ------------------------------


@pytest.fixture(scope="module")
def region_ignore_dataset(tiny_ct_case, tmp_path_factory):
    """Dataset950_RegionsIgnore: the tiny CT crop twice (one flipped), labels liver = 1, other
    organs = 2, regions ``organs = [1, 2]`` and ``liver = 1``, the first 6 slices' background = ignore 3."""
    from ReCoKDLib.data.io import read_image, write_image
    from ReCoKDLib.data.layout import write_dataset_json

    root = tmp_path_factory.mktemp("nnunet_raw") / "Dataset950_RegionsIgnore"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    image, geometry = read_image(tiny_ct_case.image_paths[0], allow_channels=False)
    source, _ = read_image(tiny_ct_case.label_path, allow_channels=False)
    label = np.where(source == 1, 1, np.where(source > 1, 2, 0)).astype(np.uint8)
    label[:6][label[:6] == 0] = 3
    for case, flip in (("ct_a", False), ("ct_b", True)):
        img, lab = (image[:, :, ::-1].copy(), label[:, :, ::-1].copy()) if flip else (image, label)
        write_image(img, geometry, root / "imagesTr" / f"{case}_0000.nii.gz")
        write_image(lab, geometry, root / "labelsTr" / f"{case}.nii.gz")
    write_dataset_json(root, {"0": "CT"}, {"background": 0, "organs": [1, 2], "liver": 1, "ignore": 3}, 2,
                       regions_class_order=[2, 1])
    return root, label


def _spacing(root):
    """The crop's own spacing (D, H, W): preprocessing then keeps its grid."""
    from ReCoKDLib.data.io import read_image

    return [float(s) for s in reversed(read_image(root / "imagesTr" / "ct_a_0000.nii.gz")[1].spacing)]


def test_raw_dataset_reads_regions_and_the_ignore_label(region_ignore_dataset):
    from ReCoKDLib.data.layout import RawDataset

    root, _ = region_ignore_dataset
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"]["organs"] == [1, 2] and meta["regions_class_order"] == [2, 1]
    ds = RawDataset.open(root)
    assert ds.class_names == ["background", "liver", "label_2"] and ds.num_classes == 3
    assert ds.ignore_label == 3
    spec = ds.label_spec
    assert spec.has_regions and spec.regions == [(1, 2), (1,)] and spec.head_names == ["organs", "liver"]
    ds.validate()  # the ignore value 3 is a declared value


def test_raw_dataset_refuses_undeclared_values_and_bad_regions(region_ignore_dataset, tmp_path):
    import shutil

    from ReCoKDLib.data.io import read_image, write_image
    from ReCoKDLib.data.layout import DatasetLayoutError, RawDataset

    root, _ = region_ignore_dataset
    copy_root = tmp_path / root.name
    shutil.copytree(root, copy_root)
    label, geometry = read_image(copy_root / "labelsTr" / "ct_a.nii.gz", allow_channels=False)
    label[0, 0, 0] = 4
    write_image(label, geometry, copy_root / "labelsTr" / "ct_a.nii.gz")
    with pytest.raises(DatasetLayoutError, match=r"label values \[4\] are not declared"):
        RawDataset.open(copy_root).validate()
    meta = json.loads((copy_root / "dataset.json").read_text())
    del meta["regions_class_order"]
    (copy_root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetLayoutError, match="regions_class_order"):
        RawDataset.open(copy_root)


def test_prepared_cases_mark_ignored_voxels_minus_one(region_ignore_dataset):
    from ReCoKDLib.data.layout import RawDataset
    from ReCoKDLib.data.preprocess import preprocess_case
    from ReCoKDLib.data.sampling import SamplingError, prepare_cases

    root, label = region_ignore_dataset
    ds = RawDataset.open(root)
    params = {"spacing": _spacing(root), "normalization": {"scheme": "zscore"}}
    case_set = prepare_cases(ds.training_cases(), ds.class_names, preprocess_case, params, label_spec=ds.label_spec)
    first = np.asarray(case_set.cases[0].label)[0]
    # same grid (no resampling), LPS order kept or permuted: compare counts, not positions
    assert int((first == IGNORED).sum()) == int((label == 3).sum()) > 0
    assert set(np.unique(first).tolist()) == {IGNORED, 0, 1, 2}
    train, val = case_set.split(1)
    assert train.label_spec == ds.label_spec and val.label_spec == ds.label_spec
    # without the spec the ignore value is an unknown class
    with pytest.raises(SamplingError, match=r"outside the 3 classes"):
        prepare_cases(ds.training_cases(), ds.class_names, preprocess_case, params)


def test_training_on_an_ignore_dataset_never_learns_from_ignored_voxels(region_ignore_dataset, tmp_path):
    """A few teacher-training steps: the engine picks the masked loss and runs with -1 labels."""
    from ReCoKDLib.data.preprocess import preprocess_case
    from ReCoKDLib.data.sampling import prepare_cases
    from ReCoKDLib.engine import TrainConfig, build_seg_loss, train_teacher
    from ReCoKDLib.networks import preset
    from ReCoKDLib.nnunet.labels import DeepSupervisionSegLoss

    from ReCoKDLib.data.layout import RawDataset

    root, _ = region_ignore_dataset
    ds = RawDataset.open(root)
    plain = ds.label_spec.__class__(("background", "liver", "other"), ((0,), (1,), (2,)), ignore_label=3)
    case_set = prepare_cases(ds.training_cases(), ds.class_names, preprocess_case,
                             {"spacing": _spacing(root), "normalization": {"scheme": "zscore"}}, label_spec=plain)
    assert isinstance(build_seg_loss(2, ignore=True), DeepSupervisionSegLoss)
    config = TrainConfig(patch_size=(16, 32, 32), batch_size=2, steps=2, num_val_cases=0, device="cpu",
                         network=preset("tiny").to_dict(), ema_decay=0.0, oversample_foreground=1.0,
                         augmentation={"enabled": False}, log_every=1)
    result = train_teacher(config, case_set, tmp_path / "run")
    assert result.step == 2 and all(np.isfinite(h["seg"]) for h in result.history["train"])
