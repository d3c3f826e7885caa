"""Progress events: one schema for the terminal bar, JSON lines, the Slicer panel and scripts.

Long jobs report through a :class:`Reporter`. With ``--progress json`` every event is one JSON
object on its own line of standard output (nothing else is printed there), so a parent process
(the Slicer module, a batch script) reads it line by line. Schema, version 1:

===============  ========================================================================
key              meaning
===============  ========================================================================
``event``        ``"start"``, ``"progress"``, ``"metrics"``, ``"checkpoint"``, ``"log"``,
                 ``"warning"``, ``"error"`` or ``"done"``
``stage``        what runs: ``"fetch"``, ``"preprocess"``, ``"train-teacher"``, ``"distill"``,
                 ``"validate"``, ``"segment"``, ``"evaluate"``, ``"export"``, ``"demo"``
``step``         steps done in this stage (int), with ``total`` the planned number
``eta_s``        estimated seconds left in this stage (float or null)
``losses``       ``{"total": .., "seg": .., "kd": .., <kd term>: ..}`` (progress events)
``lr``           current learning rate
``metrics``      ``{"mean_dice": .., "dice": {class name: ..}, ...}`` (metrics events)
``path``         a written file (checkpoint and done events)
``message``      human-readable text (log, warning, error; optional elsewhere)
``time``         seconds since the reporter started
``v``            schema version (1)
``best_path``    ``done`` of training stages: the best-validation model file (or null)
``cancelled``    ``done`` of training stages: true when stopped by SIGTERM or ``<out>/STOP``
                 (checkpoint written; exit code 0 after ``STOP``, 143 after SIGTERM;
                 continue with ``--resume``)
``entry_point``  ``error`` of a model file naming code nobody trusted: the refused
                 ``"package.module:callable"`` (what ``--trust-entry-point`` takes), with
                 ``entry_point_source``, the file that names it (:mod:`ReCoKDLib.trust`)
===============  ========================================================================

The ``done`` event of training stages also carries ``stopped_early`` (true when early stopping
ended the run), ``step`` and the final ``metrics``. Training ``losses`` also carry ``kd_lambda``
(the KD weight of that step) and each KD method's weighted value under its name plus its own
terms as ``"<method>/<term>"``.

An ``error`` event is always followed by a non-zero exit code; ``done`` by exit code 0, except a
training run stopped by SIGTERM (``done`` with ``cancelled``, then a ``log`` saying how to resume, exit
143). Exit codes: :mod:`ReCoKDLib.commands.runner`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Callable, TextIO

SCHEMA_VERSION = 1
EVENTS = ("start", "progress", "metrics", "checkpoint", "log", "warning", "error", "done")


def _clean(value: Any) -> Any:
    """Make ``value`` JSON-safe: tensors and numpy scalars to floats, NaN/Inf to null."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


class Reporter:
    """Sends progress events somewhere. The base class forwards them to an optional callback.

    Args:
        callback: called with every event dict (the Slicer logic and tests use this).
    """

    def __init__(self, callback: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.callback = callback
        self._t0 = time.monotonic()
        self._stage_start: dict[str, tuple[float, int]] = {}

    def emit(self, event: str, stage: str, **fields: Any) -> dict[str, Any]:
        """Build, validate and deliver one event; returns it."""
        if event not in EVENTS:
            raise ValueError(f"unknown progress event {event!r}; expected one of {EVENTS}")
        record = {"v": SCHEMA_VERSION, "event": event, "stage": stage, "time": round(time.monotonic() - self._t0, 3)}
        record.update(_clean(fields))
        self.deliver(record)
        if self.callback is not None:
            self.callback(record)
        return record

    def deliver(self, record: dict[str, Any]) -> None:  # overridden by the concrete reporters
        pass

    # Convenience wrappers -------------------------------------------------------------------
    def start(self, stage: str, total: int | None = None, **fields: Any) -> None:
        self._stage_start[stage] = (time.monotonic(), 0)
        self.emit("start", stage, total=total, **fields)

    def progress(self, stage: str, step: int, total: int | None = None, **fields: Any) -> None:
        """Report ``step`` of ``total``; ``eta_s`` is estimated from the stage's rate so far."""
        t_start, s_start = self._stage_start.setdefault(stage, (time.monotonic(), step))
        eta = None
        if total and step > s_start:
            rate = (time.monotonic() - t_start) / (step - s_start)
            eta = round(rate * max(total - step, 0), 1)
        self.emit("progress", stage, step=step, total=total, eta_s=eta, **fields)

    def metrics(self, stage: str, metrics: dict[str, Any], **fields: Any) -> None:
        self.emit("metrics", stage, metrics=metrics, **fields)

    def checkpoint(self, stage: str, path: str, **fields: Any) -> None:
        self.emit("checkpoint", stage, path=str(path), **fields)

    def log(self, stage: str, message: str, **fields: Any) -> None:
        self.emit("log", stage, message=message, **fields)

    def warning(self, stage: str, message: str, **fields: Any) -> None:
        self.emit("warning", stage, message=message, **fields)

    def error(self, stage: str, message: str, **fields: Any) -> None:
        self.emit("error", stage, message=message, **fields)

    def done(self, stage: str, **fields: Any) -> None:
        self.emit("done", stage, **fields)

    def close(self) -> None:
        pass


class JsonLinesReporter(Reporter):
    """One JSON object per line on ``stream`` (standard output by default), flushed at once."""

    def __init__(self, stream: TextIO | None = None, callback: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__(callback)
        self.stream = stream or sys.stdout

    def deliver(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.stream.flush()


class TerminalReporter(Reporter):
    """A tqdm bar per stage on standard error, and log/warning/error lines above it.

    Routine checkpoints print no line (one every few dozen steps would break the bars up): the
    bar of their stage shows the last saved step instead (``saved=N``); JSON lines keep every event.
    """

    def __init__(self, callback: Callable[[dict[str, Any]], None] | None = None, stream: TextIO | None = None) -> None:
        super().__init__(callback)
        self.stream = stream or sys.stderr
        self._bars: dict[str, Any] = {}
        self._postfix: dict[str, dict[str, str]] = {}

    def _bar(self, stage: str, total: int | None):
        from tqdm import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=stage, file=self.stream, dynamic_ncols=True, leave=True)
        return bar

    def deliver(self, record: dict[str, Any]) -> None:
        event, stage = record["event"], record["stage"]
        if event == "start" and record.get("total"):
            self._bar(stage, record["total"])
        elif event == "progress":
            bar = self._bar(stage, record.get("total"))
            bar.n = record.get("step", bar.n)
            losses = record.get("losses") or {}
            if losses:
                # The bar shows the top-level losses; per-method and per-level terms ("a/b") stay in JSON lines.
                shown = {k: f"{v:.4g}" for k, v in losses.items() if isinstance(v, (int, float)) and "/" not in k}
                self._postfix[stage] = {**shown, **{k: v for k, v in self._postfix.get(stage, {}).items() if k == "saved"}}
                bar.set_postfix(self._postfix[stage], refresh=False)
            bar.refresh()
        elif event == "checkpoint" and stage in self._bars:
            bar = self._bars[stage]
            self._postfix[stage] = {**self._postfix.get(stage, {}), "saved": str(record.get("step", ""))}
            bar.set_postfix(self._postfix[stage], refresh=True)
        elif event in ("log", "warning", "error", "metrics", "checkpoint", "done"):
            text = record.get("message") or ""
            if event == "metrics":
                m = record.get("metrics", {})
                text = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items() if not isinstance(v, dict))
            elif event == "checkpoint":
                text = f"checkpoint {record.get('path')}"
            elif event == "done":
                bar = self._bars.pop(stage, None)
                self._postfix.pop(stage, None)
                if bar is not None:
                    bar.close()
                text = text or (f"done: {record['path']}" if record.get("path") else "")
            if text:
                prefix = {"warning": "warning: ", "error": "error: "}.get(event, "")
                line = f"[{stage}] {prefix}{text}"
                bar = self._bars.get(stage)
                if bar is not None:
                    bar.write(line, file=self.stream)
                else:
                    print(line, file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


def make_reporter(kind: str = "auto", callback: Callable[[dict[str, Any]], None] | None = None) -> Reporter:
    """``"json"``: JSON lines on stdout; ``"bar"`` (and ``"auto"``): tqdm bar and log lines on
    stderr; ``"none"``: callback only."""
    if kind == "json":
        return JsonLinesReporter(callback=callback)
    if kind in ("bar", "auto"):
        return TerminalReporter(callback=callback)
    if kind == "none":
        return Reporter(callback)
    raise ValueError(f"unknown progress kind {kind!r}; choose auto, json, bar or none")


def add_progress_argument(parser) -> None:
    """The shared ``--progress {auto,json,bar,none}`` option of long-running subcommands."""
    parser.add_argument(
        "--progress", choices=("auto", "json", "bar", "none"), default="auto",
        help="how to report progress: a bar and log lines on stderr (auto, bar), JSON lines (one event per line on stdout; "
        "schema in ReCoKDLib.progress) for scripts and the Slicer module (default: auto)",
    )
