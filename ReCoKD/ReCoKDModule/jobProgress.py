"""A child job's state, built from its ``--progress json`` lines (schema: ``ReCoKDLib.progress``).

No Qt and no MRML: the panel and the console read a :class:`JobProgress`, tests feed it lines.
"""

import json
import math
from dataclasses import dataclass, field
from typing import Optional

from slicer.i18n import tr as _

#: how many log lines a job keeps (the panel's log pane keeps its own, longer history)
LOG_TAIL = 200


def formatDuration(seconds: Optional[float]) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``; empty for unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


@dataclass
class JobProgress:
    """State of a child job.

    ``feed(line)`` takes one line of the child's standard output or error: JSON events update the
    state; any other text (a Python warning, a traceback on stderr) is kept as a log line, so
    nothing the child says is lost. :meth:`takeNewLog` hands each log line out once (the panel
    appends exactly those to its log pane).
    """

    stage: str = ""
    step: int = 0
    total: Optional[int] = None
    etaSeconds: Optional[float] = None
    losses: list = field(default_factory=list)  # [(step, total loss)]
    dice: list = field(default_factory=list)  # [(step, mean validation Dice)]
    log: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    error: Optional[str] = None
    #: the entry point (``"package.module:callable"``) a job was refused because nobody trusted it,
    #: and the file that names it: the ``error`` event's ``entry_point`` / ``entry_point_source``
    untrustedEntryPoint: Optional[str] = None
    untrustedSource: Optional[str] = None
    resultPath: Optional[str] = None
    result: dict = field(default_factory=dict)  # the ``done`` event (classes, colours, seconds, ...)
    done: bool = False
    _logHandedOut: int = 0

    def fraction(self) -> Optional[float]:
        """Progress in [0, 1] of the current stage; None while unknown."""
        if self.done:
            return 1.0
        if not self.total:
            return None
        return min(max(self.step / self.total, 0.0), 1.0)

    def etaText(self) -> str:
        if self.done:
            return _("Done")
        eta = formatDuration(self.etaSeconds)
        stage = f"{self.stage}: " if self.stage else ""
        count = f"{self.step}/{self.total}" if self.total else ""
        return f"{stage}{count}" + (f", {eta} left" if eta else "")

    def takeNewLog(self) -> list:
        """The log lines added since the last call (each line is handed out once)."""
        new = self.log[self._logHandedOut:]
        del self.log[:max(0, len(self.log) - LOG_TAIL)]
        self._logHandedOut = len(self.log)
        return new

    def feed(self, line: str) -> Optional[dict]:
        """Update from one output line; returns the parsed event (None for plain text)."""
        text = line.rstrip("\r\n")
        if not text.strip():
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "event" not in record:
            self.log.append(text)
            return None
        self._apply(record)
        return record

    def _apply(self, record: dict) -> None:
        event, stage = record.get("event"), record.get("stage", "")
        if stage and event in ("start", "progress"):
            if stage != self.stage:
                self.step, self.total, self.etaSeconds = 0, None, None
            self.stage = stage
        if event == "start":
            self.total = record.get("total") or self.total
            self.log.append(f"[{stage}] " + (record.get("message") or _("started")))
        elif event == "progress":
            self.step = int(record.get("step") or 0)
            self.total = record.get("total") or self.total
            self.etaSeconds = record.get("eta_s")
            loss = _totalLoss(record.get("losses"))
            if loss is not None and stage != "validate":
                self.losses.append((self.step, loss))
        elif event == "metrics":
            metrics = record.get("metrics") or {}
            meanDice = metrics.get("mean_dice")
            if isinstance(meanDice, (int, float)):
                self.dice.append((int(record.get("step", self.step) or self.step), float(meanDice)))
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            self.log.append(f"[{stage}] {shown}" if shown else f"[{stage}] metrics")
        elif event == "checkpoint":
            self.checkpoints.append(record.get("path"))
            self.log.append(f"[{stage}] " + _("checkpoint written: {path}").format(path=record.get("path")))
        elif event in ("log", "warning"):
            prefix = _("warning: ") if event == "warning" else ""
            self.log.append(f"[{stage}] {prefix}{record.get('message', '')}")
        elif event == "error":
            self.error = record.get("message") or _("the job failed without a message")
            if record.get("entry_point"):
                self.untrustedEntryPoint = str(record["entry_point"])
                self.untrustedSource = str(record.get("entry_point_source") or "")
            self.log.append(f"[{stage}] " + _("error: ") + self.error)
        elif event == "done":
            self.done = True
            self.result = dict(record)
            # training jobs name the best model (validation Dice) beside the last one
            self.resultPath = record.get("best_path") or record.get("path") or self.resultPath
            self.etaSeconds = 0.0
            self.log.append(f"[{stage}] " + (record.get("message") or _("done")))


def _totalLoss(losses) -> Optional[float]:
    if not isinstance(losses, dict):
        return None
    value = losses.get("total", next((v for v in losses.values() if isinstance(v, (int, float))), None))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
