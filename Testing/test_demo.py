"""``recokd demo``: the main job end to end on the real CT data, with a tiny step budget."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ReCoKDLib.checkpoint import read_model_card
from ReCoKDLib.cli import main
from ReCoKDLib.demo import MODEL_NAMES, format_table, quick_config, run_demo
from ReCoKDLib.progress import Reporter


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--full" in text and "--out" in text and "metrics.json" in text


def test_demo_end_to_end_then_reuses_finished_runs(tmp_path, data_root, ct_dataset):
    config = replace(quick_config(0.005), latency_repeats=1)  # a few steps per run
    out = tmp_path / "demo"
    metrics = run_demo(out, data_dir=data_root, config=config, device="cpu")

    organs = ct_dataset.class_names[1:]
    assert list(metrics) == list(MODEL_NAMES)
    assert json.loads((out / "metrics.json").read_text()).keys() == metrics.keys()
    for name, record in metrics.items():
        assert list(record["dice"]) == organs, name
        assert 0.0 <= record["mean_dice"] <= 1.0
        assert record["params"] > 0 and record["latency_s"] > 0 and record["latency_bf16_s"] > 0
    # The students are the teacher's architecture with widths / 4: 16x fewer parameters or so.
    assert metrics["student"]["params"] == metrics["distilled"]["params"]
    assert metrics["teacher"]["params"] > 10 * metrics["student"]["params"]
    assert (out / "report.html").stat().st_size > 0
    summary = (out / "summary.txt").read_text()
    assert "mean Dice" in summary and "distilled" in summary

    assert read_model_card(out / "student" / "model_last.pt").role == "student"
    distilled_card = read_model_card(out / "distilled" / "model_last.pt")
    assert distilled_card.role == "student" and "recokd" in distilled_card.kd["methods"]

    # A second run reuses every finished stage: no training step is reported.
    events = []
    again = run_demo(out, data_dir=data_root, config=config, device="cpu", reporter=Reporter(events.append))
    assert not [e for e in events if e["event"] == "progress" and e["stage"] in ("train-teacher", "distill")]
    assert sum("reusing" in (e.get("message") or "") for e in events) == 3
    assert {n: r["mean_dice"] for n, r in again.items()} == {n: r["mean_dice"] for n, r in metrics.items()}


def test_format_table_lists_models_and_classes():
    record = {"dice": {"liver": 0.5, "spleen": None}, "mean_dice": 0.25, "params": 1000, "latency_s": 1.5}
    table = format_table({"teacher": record, "student": record})
    assert "liver" in table and "spleen" in table and "n/a" in table and "1,000" in table
