"""Slicer's own slice views rendered offscreen (``ReCoKDLib.mrml.views``), checked by pixels on real CT.

The scene is the ``tiny_ct_case`` crop of the TotalSegmentator S1 scan (32x64x64, 3 mm); views are
small (160x160) so each test renders in well under a second after the ~2 s app start.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="offscreen views need the slicer-core wheel (render extra)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' is not slicer-core", allow_module_level=True)
pytest.importorskip("trame_slicer", reason="offscreen views need trame-slicer (render extra)")

from ReCoKDLib.data.io import read_image  # noqa: E402
from ReCoKDLib.mrml import views as V  # noqa: E402

pytestmark = pytest.mark.mrml

LIVER_RGB = np.array([0.86, 0.24, 0.22])  # colour of class 1 (mrml.default_class_colors)
FILL = 0.35
TOL = 3  # 8-bit rounding of blending and the window/level LUT


@pytest.fixture(scope="module")
def ct(tiny_ct_case):
    image, geometry = read_image(tiny_ct_case.image_paths[0], allow_channels=False)
    label, _ = read_image(tiny_ct_case.label_path, allow_channels=False)
    liver = (label == 1).astype(np.uint8)
    assert liver.sum() > 1000  # the crop is centred on the liver
    return image, geometry, liver


@pytest.fixture(scope="module")
def views():
    with V.OffscreenViews(size=(160, 160), orientations=("axial", "coronal")) as v:
        yield v


@pytest.fixture()
def clean(views):
    views.clear()
    yield views
    views.clear()


def _blend_error(with_fill: np.ndarray, without: np.ndarray, rgb: np.ndarray, opacity: float) -> np.ndarray:
    expected = opacity * rgb * 255.0 + (1.0 - opacity) * without.astype(float)
    return np.abs(with_fill.astype(float) - expected).max(axis=-1)


def _fill_pixels(views, orientation="axial"):
    """(render with fill only, render without segmentation, changed-pixel mask)."""
    views.set_segmentation_opacity(FILL, 0.0)
    filled = views.render(orientation)
    views.set_segmentation_opacity(0.0, 0.0)
    plain = views.render(orientation)
    changed = np.any(filled != plain, axis=-1)
    return filled, plain, changed


@pytest.mark.parametrize("orientation", ["axial", "coronal"])
def test_segment_fill_is_alpha_blended_over_the_ct(clean, ct, orientation):
    image, geometry, liver = ct
    clean.show_volume(image, geometry, window_level=(400, 40))
    clean.show_segmentation(liver, geometry, ["background", "liver"])
    clean.focus_on_labels(liver, geometry)
    filled, plain, changed = _fill_pixels(clean, orientation)
    assert changed.sum() > 500  # the liver covers a good part of the view
    assert np.ptp(plain[changed][:, 0]) > 20  # real CT texture under the fill, not a flat colour
    error = _blend_error(filled, plain, LIVER_RGB, FILL)
    assert error[changed].max() <= TOL


def test_segmentation_added_before_the_background_still_blends(clean, ct):
    """The trame-slicer actor-order pitfall: segmentation first, then the CT."""
    image, geometry, liver = ct
    clean.show_segmentation(liver, geometry, ["background", "liver"])
    clean.show_volume(image, geometry, window_level=(400, 40))
    clean.focus_on_labels(liver, geometry)
    filled, plain, changed = _fill_pixels(clean)
    assert changed.sum() > 500
    assert _blend_error(filled, plain, LIVER_RGB, FILL)[changed].max() <= TOL


def test_without_the_workaround_fills_are_drawn_over_black_and_the_workaround_repairs_it(ct, monkeypatch):
    image, geometry, liver = ct
    monkeypatch.setattr(V, "ensure_background_layer_first", lambda view: None)
    with V.OffscreenViews(size=(160, 160), orientations=("axial",)) as raw:
        raw.show_segmentation(liver, geometry, ["background", "liver"])
        raw.show_volume(image, geometry, window_level=(400, 40))
        raw.focus_on_labels(liver, geometry)
        filled, plain, changed = _fill_pixels(raw)
        assert changed.sum() > 500
        # the bug: fill = opacity * colour over black, whatever CT lies beneath
        over_black = np.abs(filled.astype(float) - FILL * LIVER_RGB * 255).max(axis=-1)
        assert np.median(over_black[changed]) <= TOL
        assert _blend_error(filled, plain, LIVER_RGB, FILL)[changed].max() > 20

        monkeypatch.undo()
        V.ensure_background_layer_first(raw.slice_views["axial"])  # repairs an existing view
        V.ensure_background_layer_first(raw.slice_views["axial"])  # idempotent
        filled, plain, changed = _fill_pixels(raw)
        assert _blend_error(filled, plain, LIVER_RGB, FILL)[changed].max() <= TOL


def _box_scene(views, ct, opacity):
    """CT + a map that is 0.8 in a box and 0.1 elsewhere (threshold 0.5); the box's screen mask."""
    from scipy import ndimage

    image, geometry, _ = ct
    box = np.zeros(image.shape, np.uint8)
    box[8:24, 20:44, 16:40] = 1
    views.show_volume(image, geometry, window_level=(400, 40))
    views.focus_on_voxel((16, 32, 28), geometry)
    base = views.render("axial")
    # where the box is on screen: the same box as an opaque segment, nothing else shown
    seg = views.show_segmentation(box, geometry, ["background", "box"], fill=1.0, outline=0.0)
    region = np.any(views.render("axial") != base, axis=-1)
    views._remove(seg)
    views.segmentations.clear()
    map_ = np.where(box > 0, 0.8, 0.1).astype(np.float32)
    views.show_overlay(map_, geometry, "map", colormap="Viridis", window=(0.0, 1.0), threshold=0.5, opacity=opacity)
    inner = ndimage.binary_erosion(region, iterations=1)
    outer = ndimage.binary_dilation(region, iterations=1)
    return base, region, inner, outer


def test_overlay_changes_pixels_above_threshold_only(clean, ct):
    base, region, inner, outer = _box_scene(clean, ct, opacity=0.5)
    assert region.sum() > 1000
    over = clean.render("axial")
    changed = np.any(over != base, axis=-1)
    assert changed[inner].all()  # every voxel above threshold is coloured
    assert not changed[~outer].any()  # below threshold (0.1) the CT is untouched


def test_overlay_opacity_scales_the_change_proportionally(clean, ct):
    base, region, inner, outer = _box_scene(clean, ct, opacity=0.25)
    quarter = clean.render("axial").astype(float) - base
    clean.set_overlay_opacity(0.5)
    half = clean.render("axial").astype(float) - base
    clean.set_overlay_opacity(0.0)
    assert np.array_equal(clean.render("axial"), base)
    assert np.abs(half[inner]).max() > 20
    np.testing.assert_allclose(half[inner], 2.0 * quarter[inner], atol=TOL)
    assert not np.any(half[~outer])


def test_rendering_is_deterministic_and_writes_pngs(clean, ct, tmp_path):
    image, geometry, liver = ct
    clean.show_volume(image, geometry)
    clean.show_segmentation(liver, geometry, ["background", "liver"])
    clean.focus_on_labels(liver, geometry)
    first = clean.render("coronal")
    assert first.shape == (160, 160, 3) and first.dtype == np.uint8
    assert np.array_equal(first, clean.render("coronal"))
    paths = clean.render_slices(tmp_path, prefix="case_")
    assert sorted(paths) == ["axial", "coronal"]
    assert paths["coronal"].read_bytes() == V.encode_png(first)
    assert paths["axial"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_round_trip_keeps_orientation():
    import matplotlib.image as mpimg
    import io

    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[0, :, 0] = 255  # red top row
    pixels[:, 0, 2] = 200  # blue left column
    back = mpimg.imread(io.BytesIO(V.encode_png(pixels)), format="png")
    np.testing.assert_array_equal((back[..., :3] * 255).round().astype(np.uint8), pixels)


def test_bad_options_raise_render_errors(views):
    with pytest.raises(V.RenderError, match="orientations must be among"):
        V.OffscreenViews(orientations=("oblique",))
    with pytest.raises(V.RenderError, match="size must be"):
        V.OffscreenViews(size=(4, 4))
    with pytest.raises(V.RenderError, match="opacity must be in"):
        views.set_overlay_opacity(1.5)
    with pytest.raises(V.RenderError, match="no 'sagittal' view"):
        views.render("sagittal")
    with pytest.raises(V.RenderError, match="no 3D view"):
        views.render_3d()
    with pytest.raises(V.RenderError, match="uint8"):
        V.encode_png(np.zeros((4, 4), np.float32))
    assert isinstance(V.RenderError("x"), ValueError)


def test_3d_view_shows_the_segments_as_surfaces(ct, tmp_path):
    image, geometry, liver = ct
    paths = V.render_segmentation_pngs(image, geometry, liver, ["background", "liver"], tmp_path, size=(128, 128))
    assert sorted(paths) == ["3d", "axial", "coronal", "sagittal"]
    import matplotlib.image as mpimg

    threed = mpimg.imread(str(paths["3d"]))[..., :3]
    reddish = (threed[..., 0] > threed[..., 1] + 0.15) & (threed[..., 0] > threed[..., 2] + 0.15)
    assert reddish.sum() > 200  # the liver surface, lit, in its segment colour
