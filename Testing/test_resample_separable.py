"""The separable resampling of ``preprocess._resample`` against SimpleITK's ResampleImageFilter.

Between grids that share their direction, linear and cubic B-spline resampling is three per-axis
matrix products (``preprocess._separable_resample``); the matrices follow ITK's interpolators as read
in ITK at commit fee22c1e22464dea46b49d19b89b9966fa94dc2c (itkResampleImageFilter.hxx,
itkImageFunction.h, itkLinearInterpolateImageFunction.h, itkBSplineDecompositionImageFilter.hxx,
itkBSplineInterpolateImageFunction.hxx). SimpleITK, called directly here, is the reference.

Tolerance: max |new - SimpleITK| <= 1e-4 * data range. Measured (SimpleITK 2.5.7, ITK 5.4, torch 2.13):
at most 1.7e-7 of the range for linear and 4.2e-7 for B-splines over the grid pairs below, 3.5e-7 on
the preprocess_case grids and 1.8e-7 (probabilities) on the restore_to_original grids: float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

import ReCoKDLib.data.preprocess as preprocess
from ReCoKDLib.data.io import Geometry, to_sitk
from ReCoKDLib.data.preprocess import _resampled_geometry

TOLERANCE = 1e-4  # of the data range


def _sitk_resample(array, geometry, ref, ref_shape, order):
    """The reference: SimpleITK's ResampleImageFilter, default value 0, float32 output."""
    import SimpleITK as sitk

    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in reversed(tuple(ref_shape))])
    f.SetOutputSpacing(ref.spacing)
    f.SetOutputOrigin(ref.origin)
    f.SetOutputDirection(ref.direction)
    f.SetInterpolator({"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}[order])
    f.SetDefaultPixelValue(0.0)
    return sitk.GetArrayFromImage(f.Execute(to_sitk(np.asarray(array, np.float32), geometry)))


def _rotation(angle=0.3, flip_x=False) -> tuple[float, ...]:
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if flip_x:
        rotation = rotation @ np.diag([-1.0, 1.0, 1.0])
    return tuple(rotation.ravel())


IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIPPED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # a head stored RPI-like: +i right, +k inferior


def _volume(shape, kind, seed=0) -> np.ndarray:
    if kind == "random":
        return np.random.default_rng(seed).normal(50.0, 20.0, shape).astype(np.float32)
    d, h, w = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return (100 * np.exp(-(d ** 2 + h ** 2 + w ** 2) * 2) + 10 * np.sin(3 * d + 2 * w)).astype(np.float32)


def _check(array, geometry, ref, ref_shape, order):
    """The separable path was taken and agrees with SimpleITK; returns the error / range."""
    assert preprocess._axis_maps(geometry, ref, ref_shape) is not None
    expected = _sitk_resample(array, geometry, ref, ref_shape, order)
    got = preprocess._resample(array, geometry, ref, ref_shape, order)
    assert got.dtype == np.float32 and got.shape == expected.shape == tuple(ref_shape)
    error = float(np.abs(got.astype(np.float64) - expected).max()) / float(np.ptp(array) or 1.0)
    assert error <= TOLERANCE, f"{order}: max difference {error:.2e} of the range"
    return error


# (D, H, W) shape, source spacing (x, y, z), target spacing (x, y, z) or None: the same field of view at round(shape * s / t)
CASES = {
    "down_1_to_1.5": ((40, 44, 38), (1.0, 1.0, 1.0), (1.5, 1.5, 1.5)),
    "down_0.8_to_3": ((50, 45, 40), (0.8, 0.8, 0.8), (3.0, 3.0, 3.0)),
    "up_3_to_1": ((12, 14, 11), (3.0, 3.0, 3.0), (1.0, 1.0, 1.0)),
    "up_1.5_to_1": ((20, 24, 21), (1.5, 1.5, 1.5), (1.0, 1.0, 1.0)),
    "anisotropic": ((16, 40, 36), (0.7, 0.9, 3.0), (1.5, 1.2, 1.0)),
    "one_axis_kept": ((30, 32, 28), (1.0, 1.0, 2.0), (1.0, 1.0, 1.3)),  # x and y are not resampled
}


def _fov_pair(shape, spacing, target, direction, origin=(12.0, -30.5, 7.25)):
    geometry = Geometry(spacing, origin, direction)
    new_shape = preprocess.resampled_shape(shape, tuple(reversed(spacing)), tuple(reversed(target)))
    return geometry, _resampled_geometry(geometry, shape, new_shape), new_shape


@pytest.mark.parametrize("order", ["linear", "bspline"])
@pytest.mark.parametrize("kind", ["random", "smooth"])
@pytest.mark.parametrize("direction", [IDENTITY, FLIPPED, _rotation(0.3), _rotation(0.7, flip_x=True)],
                         ids=["identity", "flipped", "oblique", "oblique_flipped"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_field_of_view_matches_simpleitk(case, direction, kind, order):
    shape, spacing, target = CASES[case]
    geometry, ref, new_shape = _fov_pair(shape, spacing, target, direction)
    _check(_volume(shape, kind), geometry, ref, new_shape, order)


@pytest.mark.parametrize("order", ["linear", "bspline"])
@pytest.mark.parametrize("direction", [IDENTITY, _rotation(0.5, flip_x=True)], ids=["identity", "oblique_flipped"])
def test_partly_outside_target_grid_gets_zero_like_simpleitk(order, direction):
    """A target grid shifted by fractions of a voxel, sticking out of the source on every side."""
    shape = (18, 20, 22)
    geometry = Geometry((1.1, 0.9, 1.3), (3.0, 4.0, -5.0), direction)
    offset = np.asarray(geometry.direction_matrix) @ np.array([-3.37, -2.21, -4.05])
    ref = Geometry((0.7, 1.25, 2.1), tuple(np.asarray(geometry.origin) + offset), direction)
    ref_shape = (16, 20, 40)
    array = _volume(shape, "random", seed=3)
    _check(array, geometry, ref, ref_shape, order)
    assert (preprocess._resample(array, geometry, ref, ref_shape, order) == 0).any()  # the outside is 0


@pytest.mark.parametrize("order", ["linear", "bspline"])
@pytest.mark.parametrize("shape", [(1, 9, 10), (3, 9, 10), (9, 1, 10), (9, 10, 3), (3, 3, 3), (1, 3, 1)])
def test_tiny_axes_match_simpleitk(shape, order):
    for target, flipped in (((0.45, 0.6, 0.35), False), ((1.7, 2.3, 1.9), True)):  # up and down
        geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), FLIPPED if flipped else IDENTITY)
        new_shape = tuple(max(1, int(round(n / t))) for n, t in zip(shape, reversed(target)))
        ref = _resampled_geometry(geometry, shape, new_shape)
        _check(_volume(shape, "random", seed=sum(shape)), geometry, ref, new_shape, order)


def test_two_voxel_axes_are_separable_and_bspline_reads_no_garbage():
    """ITK's B-spline mirror maps the last tap of a 2-voxel axis to index -1 (outside the line: SimpleITK
    then reads memory outside the image, values like 7e8 that change from call to call). The separable
    path folds that tap back onto the axis: a constant stays that constant, a random volume stays within
    its range (B-splines of 2 samples per axis overshoot little), and linear still matches SimpleITK."""
    shape = (2, 9, 10)
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    new_shape = (5, 13, 14)
    ref = _resampled_geometry(geometry, shape, new_shape)
    array = _volume(shape, "random", seed=7)
    _check(array, geometry, ref, new_shape, "linear")
    constant = np.full(shape, 250.0, np.float32)
    np.testing.assert_allclose(preprocess._resample(constant, geometry, ref, new_shape, "bspline"), 250.0, rtol=1e-5)
    out = preprocess._resample(array, geometry, ref, new_shape, "bspline")
    span = float(array.max() - array.min())
    assert out.shape == new_shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert array.min() - 0.5 * span <= out.min() and out.max() <= array.max() + 0.5 * span
    np.testing.assert_array_equal(out, preprocess._resample(array, geometry, ref, new_shape, "bspline"))  # stable


def _refuse(*args, **kwargs):
    raise AssertionError("the separable path must not be taken here")


@pytest.mark.parametrize("order", ["linear", "bspline", "nearest"])
def test_different_directions_fall_back_to_simpleitk(monkeypatch, order):
    shape = (12, 14, 16)
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), _rotation(0.3))
    ref = Geometry((1.5, 1.5, 1.5), (1.0, -1.0, 0.5), _rotation(0.35))
    assert preprocess._axis_maps(geometry, ref, (8, 9, 10)) is None
    assert preprocess._axis_maps(geometry, Geometry(ref.spacing, ref.origin, FLIPPED), (8, 9, 10)) is None
    monkeypatch.setattr(preprocess, "_separable_resample", _refuse)
    array = _volume(shape, "smooth")
    got = preprocess._resample(array, geometry, ref, (8, 9, 10), order)
    np.testing.assert_array_equal(got, _sitk_resample(array, geometry, ref, (8, 9, 10), order))


def test_switch_off_uses_simpleitk(monkeypatch):
    geometry, ref, new_shape = _fov_pair((20, 22, 24), (1.0, 1.0, 1.0), (1.5, 1.5, 1.5), IDENTITY)
    monkeypatch.setattr(preprocess, "SEPARABLE_RESAMPLING", False)
    monkeypatch.setattr(preprocess, "_separable_resample", _refuse)
    array = _volume((20, 22, 24), "random")
    np.testing.assert_array_equal(preprocess._resample(array, geometry, ref, new_shape, "bspline"),
                                  _sitk_resample(array, geometry, ref, new_shape, "bspline"))


def test_axis_maps_follow_geometry():
    """offset + step * i' is the continuous source index of target voxel i' (per array axis)."""
    geometry = Geometry((0.8, 1.1, 2.5), (10.0, -5.0, 3.0), _rotation(0.4, flip_x=True))
    ref = Geometry((1.3, 0.5, 1.7), tuple(np.asarray(geometry.origin) + [0.3, -1.2, 2.2]), geometry.direction)
    ref_shape = (7, 9, 11)
    maps = preprocess._axis_maps(geometry, ref, ref_shape)
    ijk = np.array([[10, 8, 6], [0, 0, 0], [3, 5, 2]], float)  # (x, y, z) = (W, H, D) indices
    continuous = geometry.physical_to_index(ref.index_to_physical(ijk))
    for point, expected in zip(ijk, continuous):
        got = [maps[2 - k][0] + maps[2 - k][1] * point[k] for k in range(3)]
        np.testing.assert_allclose(got, expected, atol=1e-9)


def _head(shape=(60, 72, 62)):
    """A smooth ellipsoidal 'head' with noise inside, zero outside, and a 3-class label."""
    rng = np.random.default_rng(11)
    d, h, w = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    inside = d ** 2 / 0.8 + h ** 2 / 0.9 + w ** 2 / 0.7 < 0.85
    image = np.where(inside, 300 + 200 * np.cos(4 * h) + rng.normal(0, 30, shape), 0).astype(np.float32)
    label = (inside & (d > 0)).astype(np.uint8) + (inside & (w > 0.2)).astype(np.uint8)
    return image, label


@pytest.mark.parametrize("image_order", ["bspline", "linear"])
@pytest.mark.parametrize("direction", [IDENTITY, _rotation(0.25)], ids=["lps", "oblique"])
def test_preprocess_case_and_restore_match_simpleitk(monkeypatch, image_order, direction):
    """The grid pairs that preprocess_case (crop -> 1.5 mm) and restore_to_original (back to 1 mm,
    linear per probability channel) build, new path against SimpleITK forced by the module switch."""
    image, label = _head()
    geometry = Geometry((1.0, 1.0, 1.0), (-30.0, 40.0, -20.0), direction)
    norm = {"scheme": "zscore"}
    new = preprocess.preprocess_case(image, geometry, (1.5, 1.5, 1.5), norm, label, image_order=image_order)
    monkeypatch.setattr(preprocess, "SEPARABLE_RESAMPLING", False)
    ref = preprocess.preprocess_case(image, geometry, (1.5, 1.5, 1.5), norm, label, image_order=image_order)
    assert new.geometry == ref.geometry and new.crop_box == ref.crop_box and new.image.shape == ref.image.shape
    assert new.crop_shape != new.shape  # resampled, with a crop
    error = np.abs(new.image - ref.image).max() / np.ptp(ref.image)
    assert error <= TOLERANCE
    np.testing.assert_array_equal(new.label, ref.label)  # labels: nearest, SimpleITK in both

    logits = np.stack([new.image[0], -new.image[0]])
    probs = np.exp(logits) / np.exp(logits).sum(0)
    expected = preprocess.restore_to_original(probs, ref)
    monkeypatch.setattr(preprocess, "SEPARABLE_RESAMPLING", True)
    got = preprocess.restore_to_original(probs, new)
    assert got.shape == expected.shape == (2,) + image.shape
    assert np.abs(got - expected).max() <= TOLERANCE  # probabilities: range 1


def test_benchmark_smoke(tmp_path):
    """benchmarks/resample_speed.py on a tiny head writes its JSON with times, ratios and differences."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "resample_speed.py"
    out = tmp_path / "resample_speed.json"
    subprocess.run([sys.executable, str(script), "--shape", "12,14,13", "--reps", "1", "--output", str(out)],
                   check=True, capture_output=True, text=True)
    data = json.loads(out.read_text())
    assert {"date", "machine", "command", "results", "headline"} <= set(data)
    for name in ("down_bspline", "down_linear", "up_linear_2ch"):
        record = data["results"][name]
        assert record["simpleitk_seconds"] > 0 and record["separable_seconds"] > 0 and record["speedup"] > 0
        assert record["max_difference_of_range"] <= TOLERANCE
