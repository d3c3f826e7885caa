"""The MRML bridge (``ReCoKDLib.mrml``) against a real ``vtkMRMLScene`` from the slicer-core wheel."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the MRML tier needs the slicer-core wheel")
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package "slicer" (installed with shap)
    pytest.skip("the installed 'slicer' is not slicer-core", allow_module_level=True)

from ReCoKDLib import mrml  # noqa: E402
from ReCoKDLib.data.io import Geometry  # noqa: E402

pytestmark = pytest.mark.mrml


def _oblique_geometry() -> Geometry:
    """Non-unit, anisotropic spacing and a direction rotated about two axes (not axis-aligned)."""
    a, b = np.deg2rad(30.0), np.deg2rad(-20.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return Geometry(spacing=(0.7, 1.3, 2.5), origin=(-12.5, 40.0, 3.25), direction=tuple((rz @ rx).ravel()))


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def _labels(shape=(6, 7, 8)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[1:4, 2:5, 1:3] = 1
    labels[3:5, 0:2, 5:8] = 3
    labels[0, 6, 7] = 2
    return labels


def test_volume_round_trip_keeps_values_dtype_and_oblique_geometry(scene):
    geometry = _oblique_geometry()
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    node = mrml.volume_node_from_array(scene, array, geometry, "ct")
    assert node.IsA("vtkMRMLScalarVolumeNode") and node.GetName() == "ct"
    # the node's IJKToRAS is the RAS form of the LPS geometry: i axis flips in x and y
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.ijk_to_lps()
    np.testing.assert_allclose(mrml._node_ijk_to_ras(node), expected, atol=1e-9)
    back, back_geometry = mrml.array_from_volume_node(node)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back_geometry.spacing, geometry.spacing, atol=1e-9)
    np.testing.assert_allclose(back_geometry.origin, geometry.origin, atol=1e-9)
    np.testing.assert_allclose(back_geometry.direction, geometry.direction, atol=1e-9)
    # the returned array is a copy: editing it leaves the node untouched
    back[0, 0, 0] = 1e6
    assert mrml.array_from_volume_node(node)[0][0, 0, 0] == array[0, 0, 0]


def test_volume_from_array_rejects_2d_and_wrong_geometry(scene):
    with pytest.raises(ValueError, match="3D volume"):
        mrml.volume_node_from_array(scene, np.zeros((4, 4)), Geometry(), "flat")
    with pytest.raises(mrml.MRMLBridgeError, match="Geometry"):
        mrml.volume_node_from_array(scene, np.zeros((2, 2, 2)), np.eye(4), "bad")
    with pytest.raises(mrml.MRMLBridgeError, match="vtkMRMLScene"):
        mrml.volume_node_from_array(None, np.zeros((2, 2, 2)), Geometry(), "x")


def test_labelmap_to_segmentation_names_colours_and_back(scene):
    geometry = _oblique_geometry()
    labels = _labels()
    volume = mrml.volume_node_from_array(scene, labels.astype(np.float32), geometry, "image")
    names = ["background", "liver", "spleen", "kidney"]
    colors = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
    seg = mrml.segmentation_node_from_labelmap(scene, labels, geometry, names, colors, name="result",
                                               reference_volume=volume)
    segmentation = seg.GetSegmentation()
    found = {}
    for segment_id in mrml._segment_ids(segmentation):
        segment = segmentation.GetSegment(segment_id)
        found[segment.GetName()] = (segment.GetLabelValue(), tuple(round(c, 6) for c in segment.GetColor()))
    assert found == {"liver": (1, (1.0, 0.0, 0.0)), "spleen": (2, (0.0, 1.0, 0.0)), "kidney": (3, (0.0, 0.0, 1.0))}
    # the temporary label map and colour table are gone; only image and segmentation remain
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0
    assert scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems() == 0
    assert seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == volume.GetID()

    back = mrml.labelmap_from_segmentation_node(seg, volume, names)
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_array_equal(mrml.labelmap_from_segmentation_node(seg, volume), labels)


def test_labelmap_from_segmentation_maps_by_name_not_order(scene):
    labels = _labels()
    volume = mrml.volume_node_from_array(scene, np.zeros(labels.shape, np.int16), Geometry(), "image")
    seg = mrml.segmentation_node_from_labelmap(scene, labels, Geometry(), ["bg", "a", "b", "c"], reference_volume=volume)
    # a different class table: the same names in another order give the new ids
    back = mrml.labelmap_from_segmentation_node(seg, volume, ["bg", "c", "b", "a"])
    np.testing.assert_array_equal(back, np.choose(labels, [0, 3, 2, 1]))
    with pytest.raises(mrml.MRMLBridgeError, match="not one of the classes"):
        mrml.labelmap_from_segmentation_node(seg, volume, ["bg", "a", "b"])


def test_segmentation_rejects_missing_names_and_foreign_grid(scene):
    labels = _labels()
    with pytest.raises(mrml.MRMLBridgeError, match="class id 3"):
        mrml.segmentation_node_from_labelmap(scene, labels, Geometry(), ["bg", "a"])
    other = mrml.volume_node_from_array(scene, np.zeros((6, 7, 9), np.int16), Geometry(spacing=(2, 1, 1)), "other")
    with pytest.raises(mrml.MRMLBridgeError, match="not on the grid.*size.*spacing"):
        mrml.segmentation_node_from_labelmap(scene, labels, Geometry(), ["bg", "a", "b", "c"], reference_volume=other)
    with pytest.raises(mrml.MRMLBridgeError, match="fractional"):
        mrml.segmentation_node_from_labelmap(scene, labels + 0.5, Geometry(), ["bg", "a", "b", "c"])


@pytest.mark.parametrize("colormap", ["Iron", "Viridis", "Diverging"])
def test_overlay_volume_carries_colour_table_and_window(scene, colormap):
    geometry = _oblique_geometry()
    values = np.linspace(-0.5, 2.0, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    node = mrml.overlay_volume_from_array(scene, values, geometry, f"map {colormap}", colormap=colormap, threshold=0.1)
    display = node.GetDisplayNode()
    table = display.GetColorNode()
    assert table is not None and table.IsA("vtkMRMLColorTableNode") and table.GetNumberOfColors() > 100
    if colormap == "Diverging":
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((-2.0, 2.0))
        # blue at the low end, red at the high end
        low, high = [0.0] * 4, [0.0] * 4
        table.GetColor(0, low)
        table.GetColor(table.GetNumberOfColors() - 1, high)
        assert low[2] > low[0] and high[0] > high[2]
    else:
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((-0.5, 2.0))
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.1)
    np.testing.assert_allclose(mrml.array_from_volume_node(node)[0], values)


def test_overlay_rejects_unknown_colormap_and_nan(scene):
    with pytest.raises(mrml.MRMLBridgeError, match="unknown colour map"):
        mrml.overlay_volume_from_array(scene, np.zeros((2, 2, 2)), Geometry(), "m", colormap="Jet9")
    with pytest.raises(mrml.MRMLBridgeError, match="NaN"):
        mrml.overlay_volume_from_array(scene, np.full((2, 2, 2), np.nan), Geometry(), "m")


def test_place_beside_puts_result_in_the_inputs_folder(scene):
    volume = mrml.volume_node_from_array(scene, np.zeros((2, 3, 4), np.int16), Geometry(), "input")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "Study 1")
    hierarchy.CreateItem(study, volume)
    seg = mrml.segmentation_node_from_labelmap(scene, np.ones((2, 3, 4), np.uint8), Geometry(), ["bg", "fg"])
    item = mrml.place_beside(seg, volume)
    assert item and hierarchy.GetItemParent(item) == study


def test_student_output_lands_on_the_volume_node_grid(scene, tmp_path):
    """A tiny student segments a volume node; the segmentation is on that node's exact grid."""
    torch = pytest.importorskip("torch")
    infer = pytest.importorskip("ReCoKDLib.infer", reason="ReCoKDLib.infer (issue 3) not present yet")
    teachers = pytest.importorskip("ReCoKDLib.teachers", reason="ReCoKDLib.teachers not present yet")
    from ReCoKDLib import checkpoint, networks

    torch.manual_seed(0)
    config = networks.preset("tiny", num_classes=3)
    net = networks.build_unet(config)
    card = checkpoint.ModelCard(
        architecture={"kind": "dynunet", "config": config.to_dict()}, classes=["background", "a", "b"],
        spacing=[2.0, 1.0, 1.0], normalization={"scheme": "zscore"}, patch_size=[8, 16, 16], role="student")
    path = checkpoint.save_model(tmp_path / "student.pt", net.state_dict(), card)

    geometry = _oblique_geometry()
    image = np.random.default_rng(1).normal(size=(9, 14, 12)).astype(np.float32)
    volume = mrml.volume_node_from_array(scene, image, geometry, "ct")
    array, node_geometry = mrml.array_from_volume_node(volume)
    model = teachers.load_model(path, "cpu")
    labels = np.asarray(infer.segment_array(model, array, node_geometry.ijk_to_ras()))
    assert labels.shape == image.shape
    seg = mrml.segmentation_node_from_labelmap(scene, labels, node_geometry, card.classes, reference_volume=volume)
    np.testing.assert_array_equal(mrml.labelmap_from_segmentation_node(seg, volume, card.classes), labels)
