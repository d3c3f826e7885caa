"""Image I/O keeps geometry exactly; grid checks and dimension checks fail loudly."""

from __future__ import annotations

import numpy as np
import pytest

from ReCoKDLib.data.io import (
    Geometry,
    GeometryError,
    ImageDimensionError,
    ImageReadError,
    check_same_grid,
    crop,
    read_image,
    require_3d,
    resample_to_grid,
    same_grid,
    write_image,
)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE = Geometry((0.7, 1.3, 2.5), (12.5, -40.25, 101.0), tuple(_rotation(0.2, -0.35, 0.6).ravel()))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_roundtrip_keeps_oblique_geometry_and_dtypes(tmp_path, suffix):
    rng = np.random.default_rng(0)
    label = rng.integers(0, 7, size=(5, 6, 7)).astype(np.uint8)
    image = rng.normal(size=(5, 6, 7)).astype(np.float32)
    for name, array in (("label", label), ("image", image)):
        path = write_image(array, OBLIQUE, tmp_path / f"{name}{suffix}")
        back, geometry = read_image(path)
        assert back.dtype == array.dtype and back.shape == (5, 6, 7)
        np.testing.assert_array_equal(back, array)
        assert same_grid(OBLIQUE, geometry, array.shape, back.shape), (geometry, OBLIQUE)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"label{suffix}", f"image{suffix}"])  # no temp files


def test_multichannel_roundtrip(tmp_path):
    array = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5)
    back, geometry = read_image(write_image(array, OBLIQUE, tmp_path / "mc.nrrd"))
    np.testing.assert_array_equal(back, array)
    assert same_grid(OBLIQUE, geometry, array.shape, back.shape)
    with pytest.raises(ImageDimensionError, match="3D volume"):
        read_image(tmp_path / "mc.nrrd", allow_channels=False)


def test_ijk_to_ras_matches_slicer_convention_and_roundtrips():
    identity = Geometry()
    np.testing.assert_allclose(identity.ijk_to_ras(), np.diag([-1.0, -1.0, 1.0, 1.0]))
    g = Geometry((2.0, 3.0, 4.0), (10.0, 20.0, 30.0))
    # voxel (i, j, k) = (1, 1, 1) sits at LPS (12, 23, 34) -> RAS (-12, -23, 34)
    np.testing.assert_allclose(g.ijk_to_ras() @ [1, 1, 1, 1], [-12, -23, 34, 1])
    back = Geometry.from_ijk_to_ras(OBLIQUE.ijk_to_ras(), shape=(5, 6, 7))
    assert same_grid(back, OBLIQUE, (5, 6, 7), (5, 6, 7), tol=1e-9)
    np.testing.assert_allclose(OBLIQUE.physical_to_index(OBLIQUE.index_to_physical([[1, 2, 3]])), [[1, 2, 3]], atol=1e-9)
    with pytest.raises(ImageDimensionError):
        Geometry.from_ijk_to_ras(np.eye(4), shape=(5, 6))


def test_geometry_rejects_bad_values():
    with pytest.raises(GeometryError, match="spacing"):
        Geometry((1.0, 0.0, 1.0))
    with pytest.raises(GeometryError, match="orthonormal"):
        Geometry(direction=(1, 0, 0, 0, 1, 0, 0, 0, 0))


def test_check_same_grid_names_files_and_field():
    shape = (4, 5, 6)
    check_same_grid(OBLIQUE, OBLIQUE, shape, (3, *shape))  # (C, D, H, W) vs (D, H, W): same grid
    moved = Geometry(OBLIQUE.spacing, (12.5, -40.25, 102.0), OBLIQUE.direction)
    with pytest.raises(GeometryError, match=r"a\.nii\.gz and b\.nii\.gz.*origin"):
        check_same_grid(OBLIQUE, moved, shape, shape, "a.nii.gz", "b.nii.gz")
    with pytest.raises(GeometryError, match="spacing"):
        check_same_grid(Geometry((1, 1, 1)), Geometry((1, 1, 1.5)), shape, shape)
    with pytest.raises(GeometryError, match="size"):
        check_same_grid(OBLIQUE, OBLIQUE, shape, (4, 5, 7))
    with pytest.raises(GeometryError, match="direction"):
        check_same_grid(Geometry(), Geometry(direction=(1, 0, 0, 0, -1, 0, 0, 0, 1)), shape, shape)
    assert not same_grid(OBLIQUE, moved, shape, shape)


def test_dimension_errors(tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkUInt8), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(ImageDimensionError, match="flat.nii.gz"):
        read_image(tmp_path / "flat.nii.gz")
    with pytest.raises(ImageDimensionError, match="2D"):
        require_3d(np.zeros((4, 4)), "slice")
    with pytest.raises(ImageDimensionError, match=r"\(D, H, W\)"):
        require_3d(np.zeros((2, 4, 4, 4)), "volume")
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="could not read"):
        read_image(tmp_path / "junk.nii.gz")


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ImageReadError):
        write_image(np.zeros((2, 2, 2)), Geometry(), tmp_path / "x.png")
    with pytest.raises(ImageDimensionError):
        write_image(np.zeros((2, 2)), Geometry(), tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_resample_flipped_grid_is_exact_flip():
    """A label stored with the j axis reversed (like TotalSegmentator S3) maps back voxel-for-voxel."""
    rng = np.random.default_rng(1)
    label = rng.integers(0, 5, size=(3, 4, 5)).astype(np.uint8)
    target = Geometry((1.0, 2.0, 3.0), (0.0, -10.0, 5.0))
    # same physical grid, j reversed: origin moves to the last row, direction flips y
    flipped = Geometry((1.0, 2.0, 3.0), (0.0, -10.0 + 2.0 * 3, 5.0), (1, 0, 0, 0, -1, 0, 0, 0, 1))
    moved = resample_to_grid(label[:, ::-1, :], flipped, target, label.shape, "nearest")
    assert moved.dtype == np.uint8
    np.testing.assert_array_equal(moved, label)


def test_crop_keeps_world_position():
    array = np.arange(6 * 7 * 8).reshape(6, 7, 8)
    part, g = crop(array, OBLIQUE, (1, 2, 3), (2, 3, 4))
    np.testing.assert_array_equal(part, array[1:3, 2:5, 3:7])
    np.testing.assert_allclose(g.index_to_physical([[0, 0, 0]]), OBLIQUE.index_to_physical([[3, 2, 1]]))
    with pytest.raises(ValueError, match="does not fit"):
        crop(array, OBLIQUE, (5, 0, 0), (2, 1, 1))
