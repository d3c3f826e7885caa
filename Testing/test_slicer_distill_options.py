"""The Slicer module's Distill options outside Slicer: what the panel offers (teacher outputs,
labels or none, data forms) is what ``recokd distill`` accepts, checked with the CLI's own parser;
what is missing is said in words. The module's code runs under ``sys.modules`` stubs (the
``stubs``/``code`` fixtures in conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def _distill_action(dest):
    """The ``recokd distill`` option that stores ``dest``, as the CLI configures it."""
    import argparse

    from ReCoKDLib.commands.distill import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return next(a for a in parser._actions if a.dest == dest)


def _panel_choices(code, stubs, field):
    """The ``Choice`` of a ``ReCoKDParameterNode`` field: what ``QComboBoxToStringableConnector`` offers."""
    import typing

    annotation = typing.get_type_hints(code.parameters.ReCoKDParameterNode, include_extras=True)[field]
    choice = next(a for a in annotation.__metadata__ if isinstance(a, stubs["slicer.parameterNodeWrapper"].Choice))
    return tuple(choice.choices)


def test_teacher_outputs_offered_are_the_clis(code, stubs):
    """The panel's choices (and default) are ``recokd distill --teacher-outputs``'s, so no stored value
    is one the CLI refuses (``QComboBoxToStringableConnector.write`` raises for a value not among them)."""
    action = _distill_action("teacher_outputs")
    assert code.commandLines.TEACHER_OUTPUTS == tuple(action.choices) and action.default == "auto"
    assert code.commandLines.TEACHER_OUTPUTS[0] == action.default
    assert _panel_choices(code, stubs, "teacherOutputs") == tuple(action.choices)
    assert code.parameters.ReCoKDParameterNode.teacherOutputs == "auto"
    assert code.parameters.ReCoKDParameterNode.withoutLabels is False


def test_student_norms_offered_are_the_clis(code, stubs):
    """``"teacher"`` (the default) gives no option, so the CLI's default (the teacher's own) holds; the
    others are ``recokd distill --student-norm``'s choices. Slicer's ``QComboBoxToStringableConnector``
    fills the combo box with ``str(choice)`` of the ``Choice`` annotation (Base/Python/slicer/
    parameterNodeWrapper/guiConnectors.py, ``addItem(str(c))``, Slicer 583e9b3)."""
    from ReCoKDLib import cli

    action = _distill_action("student_norm")
    norms = code.commandLines.STUDENT_NORMS
    assert norms[0] == "teacher" and tuple(norms[1:]) == tuple(action.choices) and action.default is None
    assert _panel_choices(code, stubs, "studentNorm") == tuple(norms)
    assert code.parameters.ReCoKDParameterNode.studentNorm == "teacher"
    for norm in norms:
        options = code.commandLines.DistillOptions("t.pt", "data", "out", studentNorm=norm)
        args, _env = code.commandLines.distillArguments(options)
        parsed = cli.build_parser("distill").parse_args(args[2:])
        assert parsed.student_norm == (None if norm == "teacher" else norm)
    wrong = code.commandLines.DistillOptions("preset:hd-bet", "data", "out", studentNorm="layer").validate()
    assert any("Student norm must be one of teacher, instance, batch" in p for p in wrong)


def test_student_stems_offered_are_the_clis(code, stubs):
    """The panel's stems are ``recokd distill --student-stem``'s choices, its default first and the
    parameter node's default; ``"full"`` adds no option. ``QComboBoxToStringableConnector`` offers
    ``str(c)`` of each choice and its ``write`` raises ``ValueError`` for a stored value that is not
    among them (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py, Slicer 583e9b37d5)."""
    from ReCoKDLib import cli

    action = _distill_action("student_stem")
    stems = code.commandLines.STUDENT_STEMS
    assert tuple(stems) == tuple(action.choices) and stems[0] == action.default == "full"
    assert _panel_choices(code, stubs, "studentStem") == tuple(stems)
    assert code.parameters.ReCoKDParameterNode.studentStem == "full"
    for stem in stems:
        options = code.commandLines.DistillOptions("t.pt", "data", "out", studentStem=stem)
        args, _env = code.commandLines.distillArguments(options)
        assert ("--student-stem" in args) == (stem != "full")
        assert cli.build_parser("distill").parse_args(args[2:]).student_stem == stem
    wrong = code.commandLines.DistillOptions("preset:hd-bet", "data", "out", studentStem="pooled").validate()
    assert any("Student stem must be one of full, strided" in p for p in wrong)


@pytest.mark.parametrize("field,value,default,message", [
    ("studentNorm", "batch", "teacher", "keeps the teacher's normalisation"),
    ("studentStem", "strided", "full", "keeps the teacher's stages"),
])
def test_a_derived_student_option_with_an_nnunet_folder_is_refused_before_it_starts(code, tmp_path, field, value,
                                                                                     default, message):
    """The engine refuses ``--student-norm`` and ``--student-stem strided`` for a teacher that is not a
    built-in U-Net (``engine.pairing``); the panel says so before a child process starts."""
    folder = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir()
    data = tmp_path / "Dataset001"
    data.mkdir()
    options = code.commandLines.DistillOptions(str(folder), str(data), str(tmp_path / "out"), **{field: value})
    assert any(message in p for p in options.validate())
    setattr(options, field, default)
    assert options.validate() == []


@pytest.mark.parametrize("teacher_outputs", ["auto", "cache", "live"])
@pytest.mark.parametrize("data", ["dataset", "images", "image"])
@pytest.mark.parametrize("without_labels", [False, True])
def test_distill_teacher_outputs_and_labels_parse_with_the_real_cli(code, tmp_path, teacher_outputs, data,
                                                                    without_labels):
    """Labelled: ``--data FOLDER``. Without labels: ``--data FOLDER --no-labels`` for an nnU-Net folder
    (``dataset.json``), ``--images PATH`` for a folder of images or one image file (a scene volume)."""
    from ReCoKDLib import cli

    lines = code.commandLines
    dataset = tmp_path / "Dataset001"
    dataset.mkdir()
    (dataset / "dataset.json").write_text("{}")
    images = tmp_path / "images"
    images.mkdir()
    (images / "head_0000.nii.gz").write_bytes(b"image")
    path = {"dataset": dataset, "images": images, "image": images / "head_0000.nii.gz"}[data]
    options = lines.DistillOptions("t.pt", str(path), "out", teacherOutputs=teacher_outputs,
                                   withoutLabels=without_labels)
    args, _env = lines.distillArguments(options)
    parsed = cli.build_parser("distill").parse_args(args[2:])
    assert parsed.teacher_outputs == teacher_outputs and parsed.pseudo_label_weight == 1.0
    if not without_labels:
        assert (parsed.data, parsed.images, parsed.no_labels) == (str(path), None, False)
    elif data == "dataset":
        assert (parsed.data, parsed.images, parsed.no_labels) == (str(path), None, True)
    else:
        assert (parsed.data, parsed.images) == (None, [str(path)])
        from ReCoKDLib.commands.distill import _training_cases

        cases = _training_cases(parsed, ["background", "brain"])  # what the child will train on
        assert [c.case_id for c in cases] == ["head"] and cases[0].label_path is None


def test_distill_options_without_labels_accept_what_the_cli_accepts(code, tmp_path):
    lines = code.commandLines
    teacher = "preset:hd-bet"
    empty = tmp_path / "empty"
    empty.mkdir()
    image = tmp_path / "scene_000.nii.gz"
    image.write_bytes(b"image")
    dataset = tmp_path / "Dataset904"
    dataset.mkdir()
    (dataset / "dataset.json").write_text("{}")
    for path in (image, dataset):
        assert lines.DistillOptions(teacher, str(path), "out", withoutLabels=True).validate() == []
    problems = lines.DistillOptions(teacher, str(image), "out").validate()
    assert problems == ["Select labelled data: an nnU-Net folder or a volume + segmentation pair."]
    problems = lines.DistillOptions(teacher, str(empty), "out", withoutLabels=True).validate()
    assert len(problems) == 1 and "No training images" in problems[0] and "no image files" in problems[0]
    for missing in (tmp_path / "nowhere", Path("")):
        problems = lines.DistillOptions(teacher, str(missing), "out", withoutLabels=True).validate()
        assert len(problems) == 1 and "Select training images" in problems[0]
    problems = lines.DistillOptions(teacher, str(dataset), "out", teacherOutputs="disk").validate()
    assert problems == ["Teacher outputs must be one of auto, cache, live, not 'disk'."]


def test_a_broken_image_in_the_data_folder_is_a_message_not_a_crash(code, tmp_path):
    """The panel shows describeDataset's ValueError in its data summary (``panel._describeData``);
    SimpleITK raises RuntimeError for an unreadable header, which used to escape the panel's
    parameter-node observer."""
    folder = tmp_path / "Dataset950_Broken"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                     "labels": {"background": 0, "liver": 1},
                                                     "numTraining": 1, "file_ending": ".nii.gz"}))
    (folder / "imagesTr" / "case_000_0000.nii.gz").write_bytes(b"not an image")
    (folder / "labelsTr" / "case_000.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot be read"):
        code.logic.ReCoKDLogic.describeDataset(str(folder))


def test_a_data_folder_without_label_files_is_described_for_distillation_without_labels(code, tmp_path):
    from ReCoKDLib.data.io import Geometry, write_image

    folder = tmp_path / "Dataset951_Unlabelled"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "file_ending": ".nii.gz",
                                                     "labels": {"background": 0, "brain": 1}}))
    write_image(np.zeros((4, 5, 6), np.float32), Geometry(), folder / "imagesTr" / "head_0000.nii.gz")
    text = code.logic.ReCoKDLogic.describeDataset(str(folder))
    assert text.startswith("1 training / 0 test cases; classes: brain")
    assert "1 training cases without labels: distill with 'Without labels'" in text


def test_an_empty_path_edit_is_not_a_folder(code, tmp_path):
    """Issue 16 defect 4. CTK ``Libs/Widgets/ctkPathLineEdit.cpp`` (commontk/CTK 868d56c7)
    ``ctkPathLineEdit::currentPath`` returns the line edit's text, ``""`` when empty; Slicer's
    ``ctkPathLineEditToPathConnector.read`` returns ``pathlib.Path(currentPath)`` and
    ``PathSerializer.default`` is ``pathlib.Path()`` (guiConnectors.py / serializers.py, v5.10.0).
    Both are ``Path(".")``: an existing folder (Slicer's working directory)."""
    lines = code.commandLines
    empty = Path("")
    assert empty == Path(".") and empty.is_dir()
    assert lines.chosenPath(empty) is None and lines.chosenPath("") is None and lines.chosenPath(None) is None
    assert lines.chosenPath(tmp_path) == tmp_path
    problems = lines.DistillOptions(str(tmp_path / "t.pt"), str(empty), str(empty)).validate()
    assert any("labelled data" in p for p in problems) and any("output folder" in p for p in problems)
    assert code.logic.ReCoKDLogic.teacherSource(empty, "") == ""


def test_distill_options_say_what_is_missing(code, tmp_path):
    problems = code.commandLines.DistillOptions("", str(tmp_path / "nowhere"), "", reduction=3, steps=0).validate()
    assert len(problems) == 5
    assert any("teacher" in p for p in problems) and any("2, 4 or 8" in p for p in problems)
    for teacher in (str(tmp_path), "preset:hd-bet"):  # a folder or a preset is a teacher too
        assert code.commandLines.DistillOptions(teacher, str(tmp_path), str(tmp_path / "out")).validate() == []

