"""``recokd segment`` over many cases: inputs as files, folders, globs and text lists; the model
loaded once; a bar over cases; a failing case reported while the rest go on; a CSV summary with
per-case seconds and segment volumes in ml (checked against the written label maps)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from ReCoKDLib.batch import BatchInputError, expand_inputs, is_batch, segment_cases
from ReCoKDLib.data.io import read_image


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_inputs_expand_from_files_folders_globs_and_lists(tmp_path, s3_dicom_folder):
    a = _touch(tmp_path / "scans" / "a.nii.gz")
    b = _touch(tmp_path / "scans" / "b.nrrd")
    _touch(tmp_path / "scans" / "notes.md")
    other_a = _touch(tmp_path / "other" / "a.nii.gz")
    series = shutil.copytree(s3_dicom_folder, tmp_path / "dicom" / "patient_1")
    (tmp_path / "todo.txt").write_text("# tonight's cases\nother/a.nii.gz\n\nscans/b.nrrd  # again: dropped\n")
    cases = expand_inputs([tmp_path / "scans", tmp_path / "todo.txt", tmp_path / "dicom", str(tmp_path / "sc*/a.*")])
    assert [c.image for c in cases] == [a, b, other_a, series]  # order kept, duplicates dropped
    assert [c.case_id for c in cases] == ["a", "b", "other_a", "patient_1"]  # a clash gets its folder
    assert [c.is_dicom for c in cases] == [False, False, False, True]
    assert [c.image for c in expand_inputs([series])] == [series]  # a series folder is one case
    assert [c.image for c in expand_inputs(["a.nii.gz"], base=tmp_path / "scans")] == [a]
    # one case to one file is the single-case command; anything else is a batch
    assert not is_batch([str(a)], tmp_path / "a_seg.nii.gz") and not is_batch([str(series)], tmp_path / "s.nii.gz")
    for inputs, out in (([a, b], "o"), ([tmp_path / "scans"], "o"), ([tmp_path / "todo.txt"], "o"),
                        ([str(tmp_path / "*.nii.gz")], "o"), ([a], str(tmp_path) + "/")):
        assert is_batch([str(i) for i in inputs], out), inputs
    (tmp_path / "empty").mkdir()
    (tmp_path / "loop.txt").write_text("loop.txt\n")
    for entries, message in (([tmp_path / "missing.nii.gz"], "does not exist"),
                             ([str(tmp_path / "*.mha")], "matches nothing"),
                             ([tmp_path / "empty"], "holds no image file"),
                             ([tmp_path / "loop.txt"], "includes itself")):
        with pytest.raises(BatchInputError, match=message):
            expand_inputs(entries)


@pytest.mark.slow
def test_segment_many_cases_loads_the_model_once_and_goes_on_after_a_failure(tmp_path, tiny_ct_case,
                                                                             s3_dicom_folder, monkeypatch, capsys):
    from test_web_serve import _save_model

    from ReCoKDLib import cli, teachers

    model = _save_model(tmp_path / "teacher.pt")
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(tiny_ct_case.image_paths[0], scans / "first.nii.gz")
    _touch(scans / "broken.nii.gz", b"not an image")
    shutil.copy(tiny_ct_case.image_paths[0], scans / "last.nii.gz")
    (tmp_path / "cases.txt").write_text(f"scans/first.nii.gz\nscans/broken.nii.gz\n{s3_dicom_folder}\n")
    loads = []
    real_load = teachers.load_model
    monkeypatch.setattr(teachers, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    out = tmp_path / "segs"
    code = cli.main(["segment", str(model), str(tmp_path / "cases.txt"), str(scans / "last.nii.gz"), str(out),
                     "--dicom-seg", str(out / "dicom"), "--device", "cpu", "--progress", "json"])
    assert code == 2  # one case had bad input; the others were written
    assert len(loads) == 1, loads
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    steps = [e["step"] for e in events if e["stage"] == "batch" and e["event"] == "progress"]
    assert steps == [1, 2, 3, 4]
    assert any(e["event"] == "warning" and "broken: failed" in e["message"] for e in events)

    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["case"], r["status"]) for r in rows] == [("first", "ok"), ("broken", "failed"),
                                                       (s3_dicom_folder.name, "ok"), ("last", "ok")]
    assert "could not read" in rows[1]["error"] and rows[1]["liver_ml"] == ""
    for row in (rows[0], rows[2], rows[3]):
        labels, geometry = read_image(row["output"])
        voxel_ml = float(np.prod(geometry.spacing)) / 1000
        for class_id, name in enumerate(["liver", "spleen"], start=1):
            assert float(row[f"{name}_ml"]) == pytest.approx((labels == class_id).sum() * voxel_ml, abs=1e-3)
        assert float(row["seconds"]) > 0
    assert rows[2]["dicom_seg"].endswith(f"{s3_dicom_folder.name}_seg.dcm") and rows[0]["dicom_seg"] == ""
    assert (out / "dicom" / f"{s3_dicom_folder.name}_seg.dcm").is_file()
    # the NIfTI cases are the very label map the single-case command writes
    single = tmp_path / "single.nii.gz"
    assert cli.main(["segment", str(model), str(scans / "first.nii.gz"), str(single), "--device", "cpu",
                     "--progress", "none"]) == 0
    np.testing.assert_array_equal(read_image(single)[0], read_image(out / "first_seg.nii.gz")[0])


def test_an_interrupted_batch_keeps_the_summary_of_finished_cases(tmp_path, tiny_ct_case):
    from test_web_serve import _save_model

    from ReCoKDLib.teachers import load_model

    model = load_model(_save_model(tmp_path / "teacher.pt"), "cpu")
    cases = expand_inputs([tiny_ct_case.image_paths[0]] * 1 + [tiny_ct_case.label_path])

    def stop_after_first(case, result):
        if case.case_id == cases[1].case_id:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        segment_cases(model, cases, tmp_path / "out", after_case=stop_after_first, device="cpu")
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert [r["case"] for r in rows] == [cases[0].case_id]
