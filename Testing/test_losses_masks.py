"""Class-balanced region masks (kd-methods §2.4(b)), per-class masks and teacher pseudo-labels."""

import pytest
import torch

from ReCoKDLib.losses.base import KDConfigError
from ReCoKDLib.losses.masks import (
    class_balanced_region_masks,
    class_region_masks,
    pseudo_labels_from_teacher,
    resize_labels,
)


def _cube_labels():
    """2-class 4x4x4 map: class 1 is the 2x2x2 corner cube (8 voxels), background the other 56."""
    y = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    y[0, 0, :2, :2, :2] = 1
    return y


def test_two_class_masks_by_hand():
    fg, bg = class_balanced_region_masks(_cube_labels(), num_classes=2)
    assert fg.shape == bg.shape == (1, 1, 4, 4, 4)
    assert torch.allclose(fg[0, 0, :2, :2, :2], torch.full((2, 2, 2), 1 / 8))
    assert float(fg.sum()) == pytest.approx(1.0)
    assert float(bg[0, 0, 3, 3, 3]) == pytest.approx(1 / 56)
    assert float(bg[0, 0, 0, 0, 0]) == 0.0 and float(fg[0, 0, 3, 3, 3]) == 0.0
    assert float(bg.sum()) == pytest.approx(1.0)


def test_small_and_large_class_carry_equal_weight():
    y = torch.zeros(1, 1, 32, 32, 32, dtype=torch.long)
    y[0, 0, :2, :2, :2] = 1  # 8 voxels
    y[0, 0, 10:30, 10:30, 10:30] = 2  # 8000 voxels
    fg, bg = class_balanced_region_masks(y, num_classes=3)
    small = float(fg[y == 1].sum())
    large = float(fg[y == 2].sum())
    assert small == pytest.approx(1.0) and large == pytest.approx(1.0)
    assert float(bg.sum()) == pytest.approx(1.0)
    per_class = class_region_masks(y, num_classes=3)
    assert torch.allclose(per_class.flatten(2).sum(-1), torch.ones(1, 3))
    assert torch.allclose(per_class[:, 1:].sum(1, keepdim=True), fg)


def test_masks_are_per_sample_and_ignore_negative_labels():
    y = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    y[0, 0, 0, 0, :2] = 1  # sample 0: 2 fg voxels
    y[1, 0, 0, 0, 0] = -1  # sample 1: no fg, one ignored voxel
    fg, bg = class_balanced_region_masks(y, num_classes=2)
    assert float(fg[0].sum()) == pytest.approx(1.0) and float(fg[1].sum()) == 0.0
    assert float(bg[1, 0, 0, 0, 0]) == 0.0 and float(fg[1, 0, 0, 0, 0]) == 0.0
    assert float(bg[1, 0, 3, 3, 3]) == pytest.approx(1 / 63)
    assert float(bg[0, 0, 3, 3, 3]) == pytest.approx(1 / 62)


def test_region_labels_take_the_max_over_regions():
    r = torch.zeros(1, 2, 4, 4, 4)
    r[0, 0, :2] = 1  # 32 voxels
    r[0, 1, 0, 0, :2] = 1  # 2 voxels inside region 0
    fg, bg = class_balanced_region_masks(r, num_classes=3, regions=True)
    assert float(fg[0, 0, 0, 0, 0]) == pytest.approx(1 / 2)
    assert float(fg[0, 0, 1, 1, 1]) == pytest.approx(1 / 32)
    assert float(bg.sum()) == pytest.approx(1.0) and float(bg[0, 0, 3, 3, 3]) == pytest.approx(1 / 32)
    per_region = class_region_masks(r, num_classes=3, regions=True)
    assert per_region.shape == (1, 3, 4, 4, 4)


def test_bad_labels_are_rejected_with_a_clear_error():
    with pytest.raises(KDConfigError, match="outside the 2 classes"):
        class_balanced_region_masks(torch.full((1, 1, 2, 2, 2), 2), num_classes=2)
    with pytest.raises(KDConfigError, match="regions=True"):
        class_balanced_region_masks(torch.zeros(1, 3, 2, 2, 2, dtype=torch.long), num_classes=4)


def test_resized_labels_keep_class_balance():
    y = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    y[0, 0, :4, :4, :4] = 1
    small = resize_labels(y, (4, 4, 4))
    assert small.dtype == torch.long and int(small.sum()) == 8
    fg, _ = class_balanced_region_masks(small, num_classes=2)
    assert float(fg.sum()) == pytest.approx(1.0)


def test_pseudo_labels_from_teacher():
    logits = torch.zeros(1, 3, 2, 2, 2)
    logits[0, 2, 0, 0, 0] = 5.0
    ids = pseudo_labels_from_teacher(logits)
    assert ids.shape == (1, 1, 2, 2, 2) and int(ids[0, 0, 0, 0, 0]) == 2 and int(ids.sum()) == 2
    regions = pseudo_labels_from_teacher(logits, regions=True)
    assert regions.shape == (1, 3, 2, 2, 2) and int(regions.sum()) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pseudo_labels_equal_argmax_ties_included(dtype):
    """The labels are the argmax exactly (first maximal class on ties), in the cache's fp16 too."""
    logits = torch.randint(0, 3, (2, 4, 6, 7, 8)).to(dtype)  # many ties
    assert torch.equal(pseudo_labels_from_teacher(logits), logits.argmax(dim=1, keepdim=True))
