"""Patch sampling, augmentation, the preprocessed-case cache and the input checks (ReCoKDLib.data.sampling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ReCoKDLib.data.io import Geometry, GeometryError, ImageDimensionError, write_image
from ReCoKDLib.data.layout import Case
from ReCoKDLib.data.sampling import (
    AugmentationConfig,
    CaseArrays,
    CaseSet,
    PatchSampler,
    SamplingError,
    cache_key,
    class_locations,
    crop_with_padding,
    load_raw_case,
    prepare_cases,
)


def _synthetic_case(shape=(20, 40, 40), case_id="syn") -> CaseArrays:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    label = np.zeros((1, *shape), np.int16)
    label[0, 2:5, 3:7, 3:7] = 1          # small class in a corner
    label[0, 15:17, 30:33, 30:33] = 2    # tiny class in the opposite corner
    return CaseArrays(case_id, image, label)


def test_crop_with_padding_matches_manual_pad():
    array = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)
    out = crop_with_padding(array, (-2, 1, 3), (6, 3, 5), pad_value=-1)
    padded = np.pad(array, [(0, 0), (2, 0), (0, 0), (0, 2)], constant_values=-1)
    np.testing.assert_array_equal(out, padded[:, 0:6, 1:4, 3:8])


def test_class_locations_lists_each_foreground_class():
    case = _synthetic_case()
    locs = class_locations(case.label)
    assert sorted(locs) == [1, 2]
    assert len(locs[2]) == 2 * 3 * 3
    assert all(case.label[0][tuple(v)] == 2 for v in locs[2])


def test_foreground_oversampling_hits_every_present_class():
    case = _synthetic_case()
    sampler = PatchSampler(CaseSet([case], ["bg", "a", "b"]), (8, 8, 8), oversample_foreground=1.0, seed=3)
    seen = set()
    for _ in range(40):
        _, label = sampler.sample()
        values = set(np.unique(label).tolist()) - {0}
        assert values, "a forced-foreground patch holds no foreground"
        seen |= values
    assert seen == {1, 2}  # the random present class is drawn, not only the largest


def test_uniform_sampling_mostly_background_and_small_volume_padded():
    case = _synthetic_case(shape=(6, 10, 12))
    case.label[:] = 0
    case.label[0, 3, 5, 6] = 1
    case.locations = class_locations(case.label)
    sampler = PatchSampler(CaseSet([case], ["bg", "a"]), (16, 16, 16), oversample_foreground=0.0, seed=0)
    image, label = sampler.sample()
    assert image.shape == (1, 16, 16, 16) and label.shape == (1, 16, 16, 16)
    # the whole volume fits in the patch: every voxel of it is there once, the rest is padding
    assert int((label == 1).sum()) == 1
    assert int((image != 0).sum()) == case.image.size


def test_batches_are_deterministic_and_resumable():
    cases = CaseSet([_synthetic_case()], ["bg", "a", "b"])
    a = PatchSampler(cases, (8, 16, 16), augmentation=AugmentationConfig(p_affine=1.0), seed=7)
    b = PatchSampler(cases, (8, 16, 16), augmentation=AugmentationConfig(p_affine=1.0), seed=7)
    xa, ya = a.batch(3)
    xb, yb = b.batch(3)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == (3, 1, 8, 16, 16) and xa.dtype == torch.float32 and ya.dtype == torch.int64
    state = a.state_dict()
    x1, y1 = a.batch(2)
    a.load_state_dict(state)
    x2, y2 = a.batch(2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = PatchSampler(cases, (8, 16, 16), augmentation=AugmentationConfig(p_affine=1.0), seed=8)
    assert not torch.equal(other.batch(3)[0], xa)


def test_augmentation_keeps_labels_integer_class_ids():
    cases = CaseSet([_synthetic_case()], ["bg", "a", "b"])
    aug = AugmentationConfig(p_affine=1.0, flip_axes=(0, 1, 2), p_noise=1.0, p_gamma=1.0, p_brightness=1.0)
    sampler = PatchSampler(cases, (12, 16, 16), oversample_foreground=1.0, augmentation=aug, seed=1)
    plain = PatchSampler(cases, (12, 16, 16), oversample_foreground=1.0, seed=1)
    images, labels = sampler.batch(4)
    assert set(torch.unique(labels).tolist()) <= {0, 1, 2}
    assert not torch.equal(images, plain.batch(4)[0])  # augmentation changed the intensities
    with pytest.raises(SamplingError, match="unknown augmentation options"):
        AugmentationConfig.from_dict({"rotate": 3})


def test_patch_size_and_case_set_errors():
    case = _synthetic_case()
    with pytest.raises(SamplingError, match="patch_size"):
        PatchSampler(CaseSet([case], ["bg", "a", "b"]), (8, 8))
    with pytest.raises(SamplingError, match="outside the 2 classes"):
        CaseSet([case], ["bg", "a"])
    with pytest.raises(SamplingError, match="hold out"):
        CaseSet([case, _synthetic_case()], ["bg", "a", "b"]).split(2)


# --- files: cache and checks ------------------------------------------------------------------


def _write_case(folder, name, image, label, image_geometry=None, label_geometry=None) -> Case:
    geometry = Geometry(spacing=(2.0, 2.0, 3.0))
    img = write_image(image, image_geometry or geometry, folder / f"{name}_0000.nii.gz")
    lab = write_image(label, label_geometry or geometry, folder / f"{name}.nii.gz")
    return Case(name, [img], lab)


def _volume(shape=(8, 12, 12)):
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[2:5, 3:7, 3:7] = 1
    return image, label


def _identity_preprocess(calls):
    def preprocess(image, geometry, spacing, normalization, label=None):
        calls.append(1)
        return {"image": image * 2.0, "label": label, "spacing": list(spacing)}

    return preprocess


def test_prepare_cases_caches_by_content_and_parameters(tmp_path):
    image, label = _volume()
    case = _write_case(tmp_path, "a", image, label)
    calls, seen = [], []
    params = {"spacing": [3.0, 2.0, 2.0], "normalization": {"scheme": "none"}}
    run = lambda p: prepare_cases([case], ["bg", "x"], _identity_preprocess(calls), p, tmp_path / "cache",
                                  on_case=lambda i, n, cid, cached: seen.append(cached))
    first = run(params)
    second = run(params)
    assert calls == [1] and seen == [False, True]
    np.testing.assert_allclose(second.cases[0].image[0], image * 2.0)
    assert second.cases[0].label.shape == (1, *image.shape) and second.cases[0].meta["spacing"] == [3.0, 2.0, 2.0]
    assert first.source_hashes == second.source_hashes
    run({**params, "spacing": [1.5, 2.0, 2.0]})  # other parameters: preprocessed again
    assert calls == [1, 1]
    assert cache_key(["x"], params) != cache_key(["y"], params)


def test_prepare_cases_with_real_preprocessing(tiny_ct_case, tmp_path):
    from ReCoKDLib.data.preprocess import preprocess_case

    params = {"spacing": [3.0, 3.0, 3.0], "normalization": {"scheme": "ct", "clip": [-200, 300], "mean": 50.0, "std": 60.0}}
    case_set = prepare_cases([tiny_ct_case], [f"c{i}" for i in range(12)], preprocess_case, params, tmp_path)
    case = case_set.cases[0]
    assert case.image.shape[0] == 1 and case.label.shape == (1, *case.image.shape[1:])
    assert case.image.dtype == np.float32 and float(np.abs(case.image).max()) < 10  # normalised
    assert 1 in case.locations  # the liver is there to oversample


def test_geometry_mismatch_is_refused(tmp_path):
    image, label = _volume()
    case = _write_case(tmp_path, "g", image, label, label_geometry=Geometry(spacing=(2.0, 2.0, 2.5)))
    with pytest.raises(GeometryError, match="same voxel grid"):
        load_raw_case(case, 2)


def test_label_values_outside_teacher_classes_are_refused(tmp_path):
    image, label = _volume()
    label[0, 0, 0] = 7
    case = _write_case(tmp_path, "v", image, label)
    with pytest.raises(SamplingError, match=r"label values \[7\] are outside the 3 classes"):
        load_raw_case(case, 3)


def test_empty_label_is_refused(tmp_path):
    image, label = _volume()
    case = _write_case(tmp_path, "e", image, np.zeros_like(label))
    with pytest.raises(SamplingError, match="empty"):
        load_raw_case(case, 2)


def test_2d_image_is_refused(tmp_path):
    geometry = Geometry()
    import SimpleITK as sitk

    img2d = tmp_path / "flat_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((12, 12), np.float32)), str(img2d))
    _, label = _volume()
    lab = write_image(label, geometry, tmp_path / "flat.nii.gz")
    with pytest.raises(ImageDimensionError, match="3D"):
        load_raw_case(Case("flat", [img2d], lab), 2)


def test_4d_label_is_refused(tmp_path):
    image, label = _volume()
    geometry = Geometry(spacing=(2.0, 2.0, 3.0))
    img = write_image(image, geometry, tmp_path / "m_0000.nii.gz")
    lab4 = write_image(np.stack([label, label]), geometry, tmp_path / "m.nii.gz")
    with pytest.raises(ImageDimensionError, match="m label must be a 3D volume"):
        load_raw_case(Case("m", [img], lab4), 2)
