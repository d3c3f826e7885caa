"""ReCoKDLib.mrml.logic on a real vtkMRMLScene (slicer-core): segment, inspect, export.

Models are tiny DynUNets with random weights saved as ReCoKD model files; the image is a crop of
the real CT (``tiny_ct_case``) for segmentation and export, synthetic for the map tests that need
the model's own grid.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' is not slicer-core", allow_module_level=True)

from ReCoKDLib import mrml  # noqa: E402
from ReCoKDLib.data.io import Geometry, read_image  # noqa: E402
from ReCoKDLib.mrml import logic as scene_logic  # noqa: E402

pytestmark = pytest.mark.mrml

CLASSES = ["background", "liver", "spleen"]


def _save_tiny(path, classes, role="teacher", reduction=1, seed=0, spacing=(2.0, 1.0, 1.0), patch=(8, 16, 16)):
    import torch

    from ReCoKDLib import checkpoint, networks

    torch.manual_seed(seed)
    config = networks.preset("tiny", num_classes=len(classes))
    if reduction > 1:
        config = networks.derive_student_config(config, reduction)
    card = checkpoint.ModelCard(
        architecture={"kind": "dynunet", "config": config.to_dict()}, classes=list(classes),
        spacing=list(spacing), normalization={"scheme": "zscore"}, patch_size=list(patch), role=role,
        tap_names=networks.encoder_tap_names(config))
    network = networks.build_unet(config)
    with torch.no_grad():  # a bias towards class 1 so that segments surely appear
        last = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        if last.bias is not None and last.out_channels == len(classes):
            last.bias[1] += 5.0
    return checkpoint.save_model(path, network.state_dict(), card)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene_logic_models")
    return {
        "teacher": _save_tiny(folder / "teacher.pt", CLASSES),
        "student": _save_tiny(folder / "student.pt", CLASSES, role="student", reduction=2, seed=1),
        "other": _save_tiny(folder / "other.pt", ["background", "brain"], role="student", reduction=2, seed=2),
        # on the CT crop's own 3 mm grid with a large patch: a few windows on 1 CPU core
        "ct": _save_tiny(folder / "ct.pt", CLASSES, spacing=(3.0, 3.0, 3.0), patch=(16, 32, 32)),
    }


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def test_segment_a_real_ct_node_into_named_coloured_segments(scene, models, tiny_ct_case):
    image, geometry = read_image(tiny_ct_case.image_paths[0], allow_channels=False)
    volume = mrml.volume_node_from_array(scene, image, geometry, "tiny CT")
    logic = scene_logic.SceneLogic(scene)
    events = []
    from ReCoKDLib.progress import Reporter

    node = logic.segment(volume, models["ct"], device="cpu", reporter=Reporter(events.append))
    assert {e["stage"] for e in events} == {"segment"} and any(e["event"] == "progress" for e in events)
    segmentation = node.GetSegmentation()
    names = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    assert "liver" in names and names <= set(CLASSES[1:])
    liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
    assert tuple(round(c, 2) for c in liver.GetColor()) == tuple(round(c, 2) for c in mrml.default_class_colors(3)[1])
    assert node.GetAttribute("ReCoKD.Model") == str(models["ct"])
    labels = mrml.labelmap_from_segmentation_node(node, volume, CLASSES)
    assert labels.shape == image.shape and (labels == 1).any()


def test_box_limits_the_computed_voxels_and_bad_boxes_are_refused(scene, models):
    image = np.random.default_rng(0).normal(size=(10, 20, 18)).astype(np.float32)
    volume = mrml.volume_node_from_array(scene, image, Geometry((1.0, 1.0, 2.0), (5.0, -3.0, 1.0)), "ct")
    logic = scene_logic.SceneLogic(scene)
    box = (slice(2, 7), slice(3, 13), slice(4, 12))
    node = logic.segment(volume, models["student"], box=box, device="cpu")
    labels = mrml.labelmap_from_segmentation_node(node, volume, CLASSES)
    outside = np.ones(image.shape, bool)
    outside[box] = False
    assert labels[box].any() and not labels[outside].any()
    with pytest.raises(scene_logic.SceneLogicError, match="holds no voxel"):
        logic.read_volume(volume, (slice(0, 2), slice(30, 40), slice(0, 2)))
    with pytest.raises(scene_logic.SceneLogicError, match="select an input volume"):
        logic.read_volume(None)


def test_worker_thread_result_is_added_on_the_calling_thread(scene, models):
    """The split a front end uses: read on the loop, compute in a thread, add on the loop."""
    image = np.random.default_rng(1).normal(size=(8, 16, 16)).astype(np.float32)
    volume = mrml.volume_node_from_array(scene, image, Geometry((1.0, 1.0, 2.0)), "ct")
    logic = scene_logic.SceneLogic(scene)
    data = logic.read_volume(volume)
    nodes_before = scene.GetNumberOfNodes()
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=logic.run_segmentation(data, models["teacher"], "cpu")))
    worker.start()
    worker.join(60)
    assert scene.GetNumberOfNodes() == nodes_before, "the worker must not touch the scene"
    node = logic.add_segmentation(volume, result["out"], name="from thread")
    assert node.GetName() == "from thread" and node.GetSegmentation().GetNumberOfSegments() >= 1


def test_model_sources_give_clear_errors(tmp_path, models):
    with pytest.raises(scene_logic.SceneLogicError, match="no model chosen"):
        scene_logic.model_source_kind("")
    with pytest.raises(scene_logic.SceneLogicError, match="does not exist"):
        scene_logic.model_source_kind(tmp_path / "missing.pt")
    assert scene_logic.model_source_kind(models["teacher"]) == "file"
    assert scene_logic.model_source_kind("preset:hd-bet") == "preset"
    with pytest.raises(scene_logic.SceneLogicError, match="nnU-Net"):
        scene_logic.model_source_kind(tmp_path)  # an empty folder is not a model folder
    assert "2 classes (liver, spleen)" in scene_logic.describe_model_source(models["teacher"])
    bad = tmp_path / "not_a_model.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(scene_logic.SceneLogicError, match="cannot read model"):
        scene_logic.describe_model_source(bad)


def test_maps_overlay_and_region_mask_on_the_volume_grid(scene, models):
    image = np.random.default_rng(3).normal(size=(9, 13, 11)).astype(np.float32)
    volume = mrml.volume_node_from_array(scene, image, Geometry(spacing=(1.0, 1.0, 2.0)), "ct")
    labels = np.zeros(image.shape, np.int64)
    labels[2:6, 3:9, 2:8] = 1
    logic = scene_logic.SceneLogic(scene)
    maps = logic.compute_maps(volume, models["teacher"], models["student"], labels=labels)
    assert maps and all(v.shape == image.shape for v in maps.values())
    cid = scene_logic.class_key(CLASSES, "liver")
    assert cid == "1"
    mask_node = logic.add_region_mask(volume, maps, 0, cid, "liver")
    mask = mrml.labelmap_from_segmentation_node(mask_node, volume)
    np.testing.assert_array_equal(mask > 0, labels == 1)
    assert "liver level 0 (weight" in mask_node.GetSegmentation().GetNthSegment(0).GetName()
    overlay = logic.add_overlay(volume, maps, 0, "difference")
    values, _ = mrml.array_from_volume_node(overlay)
    np.testing.assert_allclose(values, maps[logic.select_map(maps, 0, "difference")])
    assert overlay.GetAttribute("ReCoKD.Overlay") == "Diverging"
    with pytest.raises(scene_logic.SceneLogicError, match="unknown map"):
        logic.add_overlay(volume, maps, 0, "saliency")


def test_class_mismatch_between_teacher_and_student_is_refused(scene, models):
    image = np.zeros((8, 16, 16), np.float32)
    volume = mrml.volume_node_from_array(scene, image, Geometry(spacing=(1.0, 1.0, 2.0)), "ct")
    with pytest.raises(scene_logic.SceneLogicError, match="different classes"):
        scene_logic.SceneLogic(scene).compute_maps(volume, models["teacher"], models["other"])


def test_export_seg_nrrd_round_trips_names_and_labels(scene, models, tmp_path):
    image = np.random.default_rng(4).normal(size=(8, 16, 16)).astype(np.float32)
    geometry = Geometry((1.0, 1.0, 2.0), (1.0, 2.0, 3.0))
    volume = mrml.volume_node_from_array(scene, image, geometry, "ct")
    labels = np.zeros(image.shape, np.uint8)
    labels[1:4, 2:9, 3:7] = 1
    labels[5:7, 10:14, 8:12] = 2
    logic = scene_logic.SceneLogic(scene)
    seg = mrml.segmentation_node_from_labelmap(scene, labels, geometry, CLASSES, reference_volume=volume)
    path = logic.export_segmentation(seg, tmp_path / "out" / "result.seg.nrrd")
    assert path.is_file() and not [p for p in path.parent.iterdir() if p != path], "no temporary file left"
    other = slicer.vtkMRMLScene()
    storage = other.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    loaded = other.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(loaded)
    segmentation = loaded.GetSegmentation()
    assert sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())) == [
        "liver", "spleen"]
    reference = mrml.volume_node_from_array(other, image, geometry, "ct")
    np.testing.assert_array_equal(mrml.labelmap_from_segmentation_node(loaded, reference, CLASSES), labels)
    with pytest.raises(scene_logic.SceneLogicError, match=".seg.nrrd"):
        logic.export_segmentation(seg, tmp_path / "result.nii.gz")
    with pytest.raises(scene_logic.SceneLogicError, match="nothing to export"):
        logic.export_segmentation(None, tmp_path / "x.seg.nrrd")


def test_export_scene_case_writes_a_one_case_dataset(scene, tmp_path):
    from ReCoKDLib.data.layout import RawDataset

    image = np.random.default_rng(5).normal(size=(6, 10, 12)).astype(np.float32)
    geometry = Geometry((1.0, 1.5, 2.0))
    volume = mrml.volume_node_from_array(scene, image, geometry, "ct")
    labels = np.zeros(image.shape, np.uint8)
    labels[2:4, 3:6, 4:8] = 1
    seg = mrml.segmentation_node_from_labelmap(scene, labels, geometry, ["background", "liver"], reference_volume=volume)
    folder = scene_logic.SceneLogic(scene).export_scene_case(volume, seg, tmp_path / "ds")
    dataset = RawDataset.open(folder)
    assert dataset.class_names == ["background", "liver"] and len(dataset.training_cases()) == 1
    written, _ = read_image(folder / "labelsTr" / "scene_000.nii.gz", allow_channels=False)
    np.testing.assert_array_equal(written, labels)


def fake_nnunet_folder(root):
    """The files ``ReCoKDLib.nnunet.is_model_folder`` looks for (JSON only; the checkpoint is empty)."""
    import json

    folder = root / "Dataset001_Organs" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans", "configurations": {
        "3d_fullres": {"spacing": [3.0, 1.5, 1.5], "patch_size": [32, 64, 64]}}}))
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2},
                                                     "channel_names": {"0": "CT"}, "numTraining": 1,
                                                     "file_ending": ".nii.gz"}))
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    return folder


def test_nnunet_folders_and_presets_are_described_without_loading(tmp_path):
    pytest.importorskip("ReCoKDLib.nnunet")
    folder = fake_nnunet_folder(tmp_path)
    assert scene_logic.model_source_kind(folder) == "nnunet"
    text = scene_logic.describe_model_source(folder)
    assert "2 classes (liver, spleen)" in text and "spacing 3 x 1.5 x 1.5 mm" in text
    presets = scene_logic.available_presets()
    if "hd-bet" in presets:  # ReCoKDLib.teacher_presets ships it
        assert "brain" in scene_logic.describe_model_source("preset:hd-bet")
    with pytest.raises(scene_logic.SceneLogicError, match="no-such-preset"):
        scene_logic.describe_model_source("preset:no-such-preset")
