"""The terminal reporter: one bar per stage, routine checkpoints folded into the bar."""

from __future__ import annotations

import io
import re

from ReCoKDLib.progress import TerminalReporter


def test_checkpoints_do_not_print_lines_between_the_bars():
    stream = io.StringIO()
    reporter = TerminalReporter(stream=stream)
    reporter.start("demo", total=3)
    reporter.start("train-teacher", total=60)
    for step in range(1, 61):
        reporter.progress("train-teacher", step, 60, losses={"total": 1.0 / step, "fit/level": 0.5})
        if step % 10 == 0:
            reporter.checkpoint("train-teacher", "/runs/t/checkpoint.pt", step=step)
    reporter.log("train-teacher", "early stop: none")
    reporter.done("train-teacher", path="/runs/t/model_last.pt")
    reporter.close()
    text = stream.getvalue()
    lines = re.findall(r"\[(?:demo|train-teacher)\] [^\r\n\x1b]*", text)
    assert not [line for line in lines if "checkpoint" in line]  # before: a line every 10 steps
    assert lines == ["[train-teacher] early stop: none", "[train-teacher] done: /runs/t/model_last.pt"]
    assert "saved=60" in text and "fit/level" not in text
