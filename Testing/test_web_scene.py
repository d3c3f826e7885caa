"""Scene housekeeping the web app relies on, against real MRML (slicer-core) and Slicer's renderer.

* removing a result also removes its subject-hierarchy item (else the hierarchy logs
  "DataNodeCache inconsistency" at the next Segment, as ``recokd serve`` did);
* an overlay threshold makes weak values transparent (the image shows through) for signed and
  unsigned maps, and 0 shows everything again.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' is not slicer-core", allow_module_level=True)

from ReCoKDLib import mrml  # noqa: E402
from ReCoKDLib.data.io import Geometry  # noqa: E402
from ReCoKDLib.mrml.logic import SceneLogic, SegmentationOutput  # noqa: E402

pytestmark = pytest.mark.mrml


def _items(hierarchy) -> int:
    import vtk

    ids = vtk.vtkIdList()
    hierarchy.GetItemChildren(hierarchy.GetSceneItemID(), ids, True)
    return ids.GetNumberOfIds()


def test_removing_results_removes_their_subject_hierarchy_items(capfd):
    scene = slicer.vtkMRMLScene()
    logic = SceneLogic(scene)
    volume = mrml.volume_node_from_array(scene, np.zeros((4, 5, 6), np.int16), Geometry(), "ct")
    output = SegmentationOutput(np.ones((4, 5, 6), np.uint8), Geometry(), ["background", "liver"], "model.pt", 0.1)
    maps = {"0/discrepancy": np.linspace(-1, 1, 120, dtype=np.float32).reshape(4, 5, 6)}
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    segmentation = logic.add_segmentation(volume, output)
    baseline_items, baseline_nodes = _items(hierarchy), scene.GetNumberOfNodes()
    for _ in range(3):  # Segment, Inspect, again and again: nothing piles up, nothing dangles
        mrml.remove_node(segmentation)
        segmentation = logic.add_segmentation(volume, output)
        overlay = logic.add_overlay(volume, maps, 0, "difference")
        mrml.remove_node(overlay)
    assert (_items(hierarchy), scene.GetNumberOfNodes()) == (baseline_items, baseline_nodes)
    mrml.remove_node(segmentation)
    mrml.remove_node(segmentation)  # already gone: nothing happens
    mrml.remove_node(None)
    logic.add_segmentation(volume, output)
    errors = capfd.readouterr().err  # VTK prints its errors on stderr (vtkLogger)
    assert "inconsistency" not in errors, errors
    assert hierarchy.GetItemByDataNode(segmentation) == 0


def test_overlay_threshold_lets_the_image_show_through():
    pytest.importorskip("trame_slicer")
    from ReCoKDLib.mrml.views import OffscreenViews

    image = np.full((6, 48, 48), 100, np.int16)
    difference = np.zeros((6, 48, 48), np.float32)
    difference[:, :, :16], difference[:, :, 16:32], difference[:, :, 32:] = -1.0, 0.05, 1.0
    affinity = np.abs(difference)
    with OffscreenViews(size=(96, 96), orientations=("axial",)) as views:
        views.show_volume(image, Geometry())
        views.set_overlay_opacity(0.0)
        views.fit()
        plain = views.render("axial")
        for values, colormap in ((difference, "Diverging"), (affinity, "Inferno")):
            node = views.show_overlay(values, Geometry(), colormap=colormap, opacity=1.0)
            tinted = views.render("axial")
            row = tinted.shape[0] // 2
            columns = [np.argmin(np.abs(np.arange(tinted.shape[1]) - c)) for c in (16, 48, 80)]
            assert all(not np.array_equal(tinted[row, c], plain[row, c]) for c in columns), colormap
            mrml.set_overlay_threshold(node, 0.2)
            hidden = views.render("axial")
            np.testing.assert_array_equal(hidden[row, columns[1]], plain[row, columns[1]])  # weak: image shows
            np.testing.assert_array_equal(hidden[row, columns[2]], tinted[row, columns[2]])  # strong: kept
            if colormap == "Diverging":  # strong negative values are kept too
                np.testing.assert_array_equal(hidden[row, columns[0]], tinted[row, columns[0]])
            mrml.set_overlay_threshold(node, 0.0)
            np.testing.assert_array_equal(views.render("axial"), tinted)
        with pytest.raises(mrml.MRMLBridgeError, match=r"in \[0, 1\)"):
            mrml.set_overlay_threshold(node, 1.5)
