"""The in-Slicer self test (``ReCoKDTest``): the whole flow on data it builds itself.

The extensions build server has no network, so nothing is downloaded: a small labelled CT-like
dataset (three cases, two "organs") and a small random teacher are written to a temporary
folder; the test then distils a student for a few steps in a child process, segments a scene
volume in the background and in-process, and inspects teacher and student.
"""

import pathlib
import tempfile
import time

import numpy as np

CLASSES = ["background", "liver", "spleen"]
SHAPE = (24, 48, 48)  # (D, H, W)
SPACING = (3.0, 3.0, 3.0)  # (x, y, z) mm as Geometry takes it


def syntheticCase(seed: int):
    """``(image (D, H, W) float32 HU-like, labels (D, H, W) uint8)``: two ellipsoids in soft tissue."""
    rng = np.random.default_rng(seed)
    d, h, w = np.indices(SHAPE, dtype=np.float32)
    image = rng.normal(-100.0, 20.0, SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.uint8)
    for value, (cd, ch, cw), radius, hu in ((1, (12, 20, 18), (7, 12, 10), 60.0), (2, (12, 30, 34), (5, 7, 7), 110.0)):
        shift = rng.integers(-2, 3, size=3)
        inside = (((d - cd - shift[0]) / radius[0]) ** 2 + ((h - ch - shift[1]) / radius[1]) ** 2
                  + ((w - cw - shift[2]) / radius[2]) ** 2) <= 1.0
        labels[inside] = value
        image[inside] = rng.normal(hu, 10.0, int(inside.sum()))
    return image, labels


def writeSyntheticDataset(folder, cases: int = 3) -> pathlib.Path:
    """An nnU-Net v2 raw dataset of :func:`syntheticCase` volumes (``dataset.json``, ``imagesTr``,
    ``labelsTr``); returns the folder."""
    from ReCoKDLib.data.io import Geometry, write_image
    from ReCoKDLib.data.layout import write_dataset_json

    folder = pathlib.Path(folder)
    geometry = Geometry(SPACING)
    for index in range(cases):
        image, labels = syntheticCase(index)
        write_image(image, geometry, folder / "imagesTr" / f"synthetic_{index:03d}_0000.nii.gz")
        write_image(labels, geometry, folder / "labelsTr" / f"synthetic_{index:03d}.nii.gz")
    write_dataset_json(folder, ["CT"], CLASSES, cases)
    return folder


def writeTinyTeacher(path, seed: int = 0) -> pathlib.Path:
    """A small random-weight ReCoKD teacher file for :data:`CLASSES` (what distillation needs:
    architecture, card, taps). Its last layer favours class 1, so segments surely appear."""
    import torch

    from ReCoKDLib import checkpoint, networks

    torch.manual_seed(seed)
    config = networks.preset("tiny", num_classes=len(CLASSES))
    card = checkpoint.ModelCard(
        architecture={"kind": "dynunet", "config": config.to_dict()}, classes=list(CLASSES),
        spacing=[SPACING[2], SPACING[1], SPACING[0]],
        normalization={"scheme": "ct", "clip": [-200.0, 300.0], "mean": 0.0, "std": 100.0},
        patch_size=[16, 32, 32], role="teacher", tap_names=networks.encoder_tap_names(config))
    network = networks.build_unet(config)
    with torch.no_grad():
        last = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        if last.bias is not None:
            last.bias[1] += 5.0
    return checkpoint.save_model(pathlib.Path(path), network.state_dict(), card)


def runSelfTest(testCase) -> None:
    """The flow, with ``testCase`` a ``ScriptedLoadableModuleTest`` (assertions, delayDisplay)."""
    import slicer

    from ReCoKDLib import mrml
    from ReCoKDLib.data.io import Geometry
    from ReCoKDModule.logic import ReCoKDLogic

    logic = ReCoKDLogic()
    testCase.assertTrue(logic.setupPythonRequirements(confirm=False), "ReCoKD's Python packages are missing")
    work = pathlib.Path(tempfile.mkdtemp(prefix="ReCoKDTest-"))

    testCase.delayDisplay("Writing a synthetic labelled dataset and a small teacher")
    dataset = writeSyntheticDataset(work / "Dataset900_Synthetic")
    testCase.assertIn("3 training", logic.describeDataset(dataset))
    teacher = str(writeTinyTeacher(work / "teacher.pt"))
    testCase.assertIn("2 classes (liver, spleen)", logic.describeModel(teacher))

    testCase.delayDisplay("Distilling a student for a few steps (child process)")
    job = _runToEnd(testCase, lambda done: logic.distill(teacher, dataset, work / "student", steps=4, device="cpu",
                                                         finished=done))
    testCase.assertTrue(job.progress.losses, "distillation reported no loss")
    student = job.progress.resultPath
    testCase.assertTrue(student and pathlib.Path(student).is_file(), "distillation wrote no student")

    testCase.delayDisplay("Segmenting in the background and in-process")
    image, _labels = syntheticCase(7)
    volume = mrml.volume_node_from_array(slicer.mrmlScene, image, Geometry(SPACING), "ReCoKDTest CT")
    results = []
    segmentJob = logic.segmentInBackground(volume, student, device="cpu",
                                           finished=lambda job, node: results.append(node))
    _waitFor(testCase, lambda: results)
    testCase.assertEqual(segmentJob.exitCode, 0, segmentJob.progress.error)
    background = results[0]
    testCase.assertIsNotNone(background, segmentJob.progress.error)
    inProcess = logic.segment(volume, student, device="cpu")
    for node in (background, inProcess):
        names = [node.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(node.GetSegmentation().GetNumberOfSegments())]
        testCase.assertTrue(names and set(names) <= set(CLASSES[1:]), names)
    # Same model, same scan; each process chooses its fastest backend that agrees with PyTorch fp32
    # (ReCoKDLib.models.backends: bf16 is accepted when >= 99 % of voxels keep their class), and the
    # choice depends on timing: one may run fp32, the other bf16. The self test's student is barely
    # trained (near-tied logits): measured 99.78 % agreement with 2 threads. Same geometry, >= 99 %.
    backgroundLabels = mrml.labelmap_from_segmentation_node(background, volume)
    inProcessLabels = mrml.labelmap_from_segmentation_node(inProcess, volume)
    testCase.assertEqual(backgroundLabels.shape, inProcessLabels.shape)
    agreement = float(np.mean(backgroundLabels == inProcessLabels))
    testCase.assertGreaterEqual(agreement, 0.99, f"background and in-process Segment agree on {agreement:.4%} of voxels")

    testCase.delayDisplay("Inspecting teacher and student")
    overlay = logic.showAffinity(volume, teacher, student, level=0, mapName="difference")
    testCase.assertIsNotNone(overlay.GetDisplayNode().GetColorNode())
    mask = logic.showRegionMask(volume, teacher, student, level=0)
    testCase.assertEqual(mask.GetSegmentation().GetNumberOfSegments(), 1)
    testCase.delayDisplay("Test passed")


def _waitFor(testCase, condition, timeoutSeconds: float = 600.0) -> None:
    import slicer

    deadline = time.monotonic() + timeoutSeconds
    while not condition():
        testCase.assertLess(time.monotonic(), deadline, "the background job did not finish in time")
        slicer.app.processEvents()
        time.sleep(0.05)


def _runToEnd(testCase, start):
    finished = []
    job = start(finished.append)
    _waitFor(testCase, lambda: finished)
    testCase.assertEqual(job.exitCode, 0, job.progress.error)
    testCase.assertTrue(job.progress.resultPath, "the job wrote no result")
    return job
