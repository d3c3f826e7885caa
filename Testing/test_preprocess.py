"""Preprocessing: normalisation, crop, resampling and the exact way back to the original grid."""

from __future__ import annotations

import numpy as np
import pytest

from ReCoKDLib.data.io import Geometry, GeometryError, ImageDimensionError
from ReCoKDLib.data.preprocess import (
    PreprocessingError,
    check_label_values,
    compute_normalization,
    nonzero_bbox,
    normalize_image,
    preprocess_case,
    resampled_shape,
    restore_to_original,
)


def _oblique(spacing=(0.8, 0.7, 2.5), origin=(10.0, -5.0, 3.0), angle=0.3) -> Geometry:
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return Geometry(spacing, origin, tuple(rotation.ravel()))


@pytest.fixture()
def case():
    """(D, H, W) = (20, 30, 25) image with a zero border and a 3-class label inside the body."""
    rng = np.random.default_rng(0)
    image = np.zeros((20, 30, 25), np.float32)
    image[2:18, 3:27, 4:22] = rng.normal(100, 20, (16, 24, 18))
    label = np.zeros(image.shape, np.uint8)
    label[5:12, 8:20, 6:15] = 1
    label[12:16, 10:14, 10:12] = 2
    return image, label, _oblique()


def test_ct_normalization_uses_foreground_percentiles(case):
    image, label, _ = case
    norm = compute_normalization([image], [label], "ct")
    fg = image[label > 0].astype(np.float64)
    assert norm["scheme"] == "ct"
    np.testing.assert_allclose(norm["clip"], np.percentile(fg, [0.5, 99.5]))
    np.testing.assert_allclose([norm["mean"], norm["std"]], [fg.mean(), fg.std()])
    out = normalize_image(image, norm)
    assert out.shape == (1,) + image.shape and out.dtype == np.float32
    expected = (np.clip(image, *norm["clip"]) - norm["mean"]) / norm["std"]
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)


def test_zscore_over_nonzero_voxels_and_none(case):
    image, _, _ = case
    out = normalize_image(image, compute_normalization([image], None, "zscore"))[0]
    inside = image != 0
    assert abs(out[inside].mean()) < 1e-4 and abs(out[inside].std() - 1) < 1e-4
    np.testing.assert_array_equal(normalize_image(image, {"scheme": "none"})[0], image)


def test_zscore_statistics_by_slabs_equal_numpy_in_float64():
    from ReCoKDLib.data.preprocess import _mean_std

    rng = np.random.default_rng(3)
    channel = (rng.normal(40.0, 9.0, (13, 11, 7)) * (rng.random((13, 11, 7)) < 0.6)).astype(np.float32)
    mask = channel != 0
    for slab_voxels in (1, 77, 150, 10**6):  # one row, partial slabs, the whole volume
        for m, values in ((None, channel), (mask, channel[mask])):
            mean, std = _mean_std(channel, m, slab_voxels)
            assert mean == pytest.approx(values.astype(np.float64).mean(), rel=1e-12)
            assert std == pytest.approx(values.astype(np.float64).std(), rel=1e-12)
    # HD-BET's variant (every voxel) and an image without zeros (the mask is skipped) agree with numpy
    out = normalize_image(channel, {"scheme": "zscore", "nonzero": False})[0]
    expected = (channel - channel.astype(np.float64).mean()) / channel.astype(np.float64).std()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    full = channel + 100.0
    np.testing.assert_allclose(normalize_image(full, {"scheme": "zscore"})[0],
                               (full - full.astype(np.float64).mean()) / full.astype(np.float64).std(), atol=1e-5)


def test_normalization_errors(case):
    image, label, _ = case
    with pytest.raises(PreprocessingError, match="unknown normalization scheme"):
        compute_normalization([image], [label], "mri")
    with pytest.raises(PreprocessingError, match="one label map per image"):
        compute_normalization([image], None, "ct")
    with pytest.raises(PreprocessingError, match="no foreground"):
        compute_normalization([image], [np.zeros_like(label)], "ct")
    with pytest.raises(PreprocessingError, match="'clip'"):
        normalize_image(image, {"scheme": "ct"})


@pytest.mark.parametrize("seed", range(6))
def test_nonzero_bbox_equals_the_box_of_the_hole_filled_mask(seed):
    """nnU-Net's crop is the box of the non-zero mask with holes filled; the projections give the same box."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    image = np.zeros((2, 20, 24, 18), np.float32)
    shell = np.zeros((20, 24, 18), bool)
    shell[3:15, 5:20, 2:16] = True
    shell[5:13, 7:18, 4:14] = False  # a closed hollow box: its inside is a hole
    image[0][shell] = rng.normal(size=int(shell.sum())) + 5
    image[1, rng.integers(0, 20), rng.integers(0, 24), rng.integers(0, 18)] = -1.0  # a stray voxel, other channel
    filled = ndimage.binary_fill_holes(np.any(image != 0, axis=0))
    expected = tuple((s.start, s.stop) for s in ndimage.find_objects(filled.astype(np.uint8))[0])
    assert nonzero_bbox(image) == expected
    assert nonzero_bbox(image[0]) == ((3, 15), (5, 20), (2, 16))


def test_nonzero_bbox_and_label_values(case):
    image, label, _ = case
    assert nonzero_bbox(image) == ((2, 18), (3, 27), (4, 22))
    assert nonzero_bbox(np.zeros((4, 5, 6))) == ((0, 4), (0, 5), (0, 6))
    check_label_values(label, 3)
    with pytest.raises(PreprocessingError, match=r"values \[2\] are outside the 2 classes \(0..1\)"):
        check_label_values(label, 2)


def test_resampling_shape_spacing_and_field_of_view(case):
    image, label, geometry = case
    pre = preprocess_case(image, geometry, (1.5, 1.0, 1.2), {"scheme": "zscore"}, label=label)
    crop_shape = (16, 24, 18)  # the non-zero box; spacing (D, H, W) = (2.5, 0.7, 0.8)
    assert pre.crop_box == ((2, 18), (3, 27), (4, 22))
    assert pre.shape == resampled_shape(crop_shape, (2.5, 0.7, 0.8), (1.5, 1.0, 1.2)) == (27, 17, 12)
    assert pre.label.shape == pre.shape and set(np.unique(pre.label)) == {0, 1, 2}
    # the resampled grid covers the same field of view: its outer voxel corners coincide
    np.testing.assert_allclose(np.array(pre.shape) * pre.spacing, np.array(crop_shape) * (2.5, 0.7, 0.8))
    first_corner = pre.geometry.index_to_physical([[-0.5, -0.5, -0.5]])
    np.testing.assert_allclose(first_corner, pre.crop_geometry.index_to_physical([[-0.5, -0.5, -0.5]]), atol=1e-9)
    # matching spacing: not resampled at all, only cropped
    same = preprocess_case(image, geometry, (2.5, 0.7, 0.8), {"scheme": "none"}, label=label)
    assert not same.resampled and same.shape == crop_shape
    np.testing.assert_array_equal(same.image[0], image[2:18, 3:27, 4:22])


def test_restore_puts_label_back_on_exact_grid(case):
    """Nearest-neighbour up by 2 and back is lossless; shape and geometry are the original's."""
    image, label, geometry = case
    pre = preprocess_case(image, geometry, (1.25, 0.35, 0.4), {"scheme": "zscore"}, label=label)
    assert pre.resampled and pre.shape == (32, 48, 36)
    back = restore_to_original(pre.label, pre)
    assert back.shape == image.shape and back.dtype == label.dtype
    np.testing.assert_array_equal(back, label)
    # without cropping, downsampled: shape exact, most voxels back
    coarse = preprocess_case(image, geometry, (3.0, 1.0, 1.0), {"scheme": "zscore"}, label=label, crop_nonzero=False)
    restored = restore_to_original(coarse.label, coarse)
    assert restored.shape == image.shape and (restored == label).mean() > 0.9


def test_restore_probabilities_fills_background_outside_crop(case):
    image, _, geometry = case
    pre = preprocess_case(image, geometry, (1.5, 1.0, 1.2), {"scheme": "zscore"})
    probs = np.zeros((3,) + pre.shape, np.float32)
    probs[2] = 1.0
    out = restore_to_original(probs, pre)
    assert out.shape == (3,) + image.shape and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 2:18, 3:27, 4:22].sum(axis=0), 1.0, atol=1e-6)
    assert out[2, 2:18, 3:27, 4:22].min() == pytest.approx(1.0)
    assert out[0, 0].min() == 1.0 and out[1:, 0].max() == 0.0  # outside the crop: background
    with pytest.raises(PreprocessingError, match="expected an array of shape"):
        restore_to_original(probs[:, :-1], pre)


def test_bad_input_is_refused(case):
    image, label, geometry = case
    with pytest.raises(ImageDimensionError, match="2D"):
        preprocess_case(image[0], geometry, None, {"scheme": "none"})
    with pytest.raises(ImageDimensionError):
        preprocess_case(image[None, None], geometry, None, {"scheme": "none"})
    with pytest.raises(PreprocessingError, match="label shape"):
        preprocess_case(image, geometry, None, {"scheme": "none"}, label=label[:-1])
    shifted = Geometry(geometry.spacing, (0.0, 0.0, 0.0), geometry.direction)
    with pytest.raises(GeometryError, match="origin"):
        preprocess_case(image, geometry, None, {"scheme": "none"}, label=label, label_geometry=shifted)
    with pytest.raises(PreprocessingError, match="outside the 2 classes"):
        preprocess_case(image, geometry, None, {"scheme": "none"}, label=label, num_classes=2)
    with pytest.raises(PreprocessingError, match="is empty"):
        preprocess_case(image, geometry, None, {"scheme": "none"}, label=np.zeros_like(label), allow_empty_label=False)
    preprocess_case(image, geometry, None, {"scheme": "none"}, label=np.zeros_like(label))  # allowed by default
    with pytest.raises(PreprocessingError, match="target spacing"):
        preprocess_case(image, geometry, (1.0, 0.0, 1.0), {"scheme": "none"})


def test_multichannel_image(case):
    image, label, geometry = case
    two = np.stack([image, 2 * image])
    pre = preprocess_case(two, geometry, (1.5, 1.0, 1.2), {"scheme": "zscore"}, label=label)
    assert pre.image.shape == (2,) + pre.shape
    np.testing.assert_allclose(pre.image[0], pre.image[1], atol=1e-4)  # z-score is per channel


def _mirrored_storage(array, geometry, flip_axes_dhw):
    """The same voxels stored with flipped axes: array flipped, direction and origin adjusted."""
    import numpy as np

    from ReCoKDLib.data.io import Geometry

    flipped = np.flip(array, axis=flip_axes_dhw).copy()
    direction = geometry.direction_matrix.copy()
    corner_index = [0, 0, 0]  # (i, j, k)
    for axis_dhw in flip_axes_dhw:
        n = 2 - axis_dhw  # sitk index axis of this array axis
        direction[:, n] *= -1
        corner_index[n] = array.shape[axis_dhw] - 1
    origin = geometry.index_to_physical(np.asarray([corner_index], float))[0]
    return flipped, Geometry(geometry.spacing, tuple(origin), tuple(direction.ravel()))


def test_cases_stored_mirrored_reach_the_network_identically_and_restore_exactly():
    """S1 and S3 of the CT sample data are stored mirrored in x and y; reorientation to LPS makes
    the network see both the same way round, and restore_to_original undoes it exactly."""
    import numpy as np

    from ReCoKDLib.data.io import Geometry
    from ReCoKDLib.data.preprocess import CANONICAL_ORIENTATION, preprocess_case, restore_to_original

    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 7, 8)).astype(np.float32) + 5
    label = rng.integers(0, 3, size=(6, 7, 8)).astype(np.uint8)
    lps = Geometry(spacing=(1.0, 1.5, 2.0), origin=(10.0, -5.0, 3.0))
    mirrored_image, ras = _mirrored_storage(image, lps, (1, 2))  # flip y (H) and x (W)
    mirrored_label, _ = _mirrored_storage(label, lps, (1, 2))
    assert ras.orientation_code() == "RAS"

    norm = {"scheme": "none"}
    a = preprocess_case(image, lps, (2.0, 1.5, 1.0), norm, label=label, crop_nonzero=False)
    b = preprocess_case(mirrored_image, ras, (2.0, 1.5, 1.0), norm, label=mirrored_label, crop_nonzero=False)
    assert b.oriented_geometry.orientation_code() == CANONICAL_ORIENTATION
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_allclose(a.geometry.origin, b.geometry.origin, atol=1e-6)

    restored = restore_to_original(b.label, b)
    np.testing.assert_array_equal(restored, mirrored_label)
    probs = np.stack([(b.label == k).astype(np.float32) for k in range(3)])
    np.testing.assert_array_equal(restore_to_original(probs, b).argmax(0), mirrored_label)


def test_sagittal_storage_is_permuted_to_axial_and_back():
    import numpy as np

    from ReCoKDLib.data.io import Geometry
    from ReCoKDLib.data.preprocess import preprocess_case, restore_to_original

    label = np.arange(4 * 5 * 6, dtype=np.int32).reshape(4, 5, 6) % 7
    # +i -> posterior, +j -> superior, +k -> left: a sagittal acquisition ("PSL")
    sagittal = Geometry(spacing=(1.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0), direction=(0, 0, 1, 1, 0, 0, 0, 1, 0))
    assert sagittal.orientation_code() == "PSL"
    pre = preprocess_case(label.astype(np.float32), sagittal, None, {"scheme": "none"}, label=label, crop_nonzero=False)
    assert pre.oriented_geometry.orientation_code() == "LPS"
    assert pre.shape == (5, 6, 4)  # (S, P, L) axes from (L, S, P) storage
    np.testing.assert_array_equal(restore_to_original(pre.label, pre), label)
