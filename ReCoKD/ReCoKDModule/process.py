"""Child processes without blocking the GUI: ``qt.QProcess``, its output read line by line, and
the cancel sequence (ask, then kill the whole process tree).
"""

import os
import pathlib
import signal
from typing import Callable, Protocol

import qt
from slicer.i18n import tr as _

from ReCoKDModule.jobProgress import JobProgress

#: how long Cancel waits for the child to write its checkpoint before killing the process tree
CANCEL_GRACE_MS = 20000


class ProcessRunner(Protocol):
    """Runs one child process without blocking; injectable (tests use a fake)."""

    def start(self, program: str, arguments: list, environment: dict, onLine: Callable, onFinished: Callable) -> None:
        """Start; ``onLine(text)`` for every line of stdout/stderr, ``onFinished(exitCode)`` once."""

    def isRunning(self) -> bool: ...

    def terminate(self) -> None:
        """Ask politely (SIGTERM to the process tree on POSIX)."""

    def kill(self) -> None:
        """Kill the whole process tree now."""


def descendantPids(pid: int) -> list:
    """Process ids of all descendants of ``pid`` (children first). ``PythonSlicer`` is a launcher
    whose child ``python-real`` does the work, so killing only ``pid`` would leave it running."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # the process is already gone
        return []
    parents = {}
    for entry in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
            parents.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def signalProcessTree(pid: int, sig) -> None:
    """Send ``sig`` to ``pid`` and all its descendants (POSIX; Windows uses ``taskkill /T``)."""
    if os.name == "nt":
        if sig == signal.SIGTERM:
            return  # no polite signal on Windows: the stop file is the request
        import subprocess

        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, check=False)
        return
    # the tree is listed before anything is signalled, and the parent goes first, so a launcher
    # cannot start a replacement child or exit cleanly while its children are being stopped
    for target in [pid, *descendantPids(pid)]:
        try:
            os.kill(target, sig)
        except (ProcessLookupError, PermissionError):
            pass


def byteArrayText(data) -> str:
    """The text of what ``QProcess.readAllStandardOutput()`` returns.

    In Slicer that is PythonQt's wrapped ``QByteArray``: it has no buffer protocol, so ``bytes(data)``
    raises ``TypeError``; its ``data()`` returns ``bytes`` (PythonQt's generated
    ``PythonQtWrapper_QByteArray::data``; Slicer's ``DICOMExportScene.py`` reads process output the
    same way). Plain ``bytes`` are accepted too.
    """
    raw = bytes(data) if isinstance(data, (bytes, bytearray)) else data.data()
    return raw.decode("utf-8", errors="replace")


class QProcessRunner:
    """:class:`ProcessRunner` on ``qt.QProcess``: output is read from Qt signals, never blocking."""

    def __init__(self):
        self.process = None
        self._buffers = {"out": "", "err": ""}

    def start(self, program, arguments, environment, onLine, onFinished):
        process = qt.QProcess()
        env = qt.QProcessEnvironment.systemEnvironment()
        for key, value in environment.items():
            env.insert(key, value)
        process.setProcessEnvironment(env)
        process.readyReadStandardOutput.connect(lambda: self._read("out", process.readAllStandardOutput(), onLine))
        process.readyReadStandardError.connect(lambda: self._read("err", process.readAllStandardError(), onLine))

        def finished(exitCode, exitStatus=None):
            for stream in ("out", "err"):
                if self._buffers[stream]:
                    onLine(self._buffers[stream])
                    self._buffers[stream] = ""
            onFinished(int(exitCode))

        process.connect("finished(int,QProcess::ExitStatus)", finished)
        process.connect("errorOccurred(QProcess::ProcessError)",
                        lambda error: onLine(_("could not start {program}: {error}").format(
                            program=program, error=process.errorString())))
        self.process = process
        process.start(program, arguments)

    def _read(self, stream, data, onLine):
        text = self._buffers[stream] + byteArrayText(data)
        *lines, self._buffers[stream] = text.split("\n")
        for line in lines:
            onLine(line)

    def isRunning(self):
        return self.process is not None and self.process.state() != qt.QProcess.NotRunning

    def terminate(self):
        if self.isRunning():
            signalProcessTree(int(self.process.processId()), signal.SIGTERM)

    def kill(self):
        if self.isRunning():
            signalProcessTree(int(self.process.processId()), getattr(signal, "SIGKILL", signal.SIGTERM))
            self.process.kill()


def qtSchedule(delayMs: int, function: Callable) -> None:
    qt.QTimer.singleShot(delayMs, function)


class ChildJob:
    """One child process with its :class:`JobProgress`, and the cancel sequence.

    Cancel writes ``<outputFolder>/STOP`` and sends SIGTERM (a training child then writes a
    checkpoint and exits); if it still runs ``graceMs`` later, the whole process tree is killed.

    ``callback(progress, record)`` runs for every output line (``record`` is the parsed event or
    ``None`` for plain text), ``finished(job)`` once at the end.
    """

    def __init__(self, runner, outputFolder=None, callback=None, finished=None,
                 schedule=qtSchedule, graceMs=CANCEL_GRACE_MS):
        self.runner = runner
        self.outputFolder = pathlib.Path(outputFolder) if outputFolder else None
        self.progress = JobProgress()
        self.callback = callback
        self.finishedCallback = finished
        self.schedule = schedule
        self.graceMs = graceMs
        self.exitCode = None
        self.cancelled = False
        self.killed = False

    def start(self, program, arguments, environment):
        if self.outputFolder is not None:
            self.stopFile.unlink(missing_ok=True)  # an old request must not stop the new run
        self.runner.start(program, arguments, environment, self.onLine, self.onFinished)

    @property
    def stopFile(self):
        return self.outputFolder / "STOP" if self.outputFolder is not None else None

    def onLine(self, line):
        record = self.progress.feed(line)
        if self.callback is not None:
            self.callback(self.progress, record)

    def onFinished(self, exitCode):
        self.exitCode = exitCode
        if exitCode != 0 and not self.cancelled and self.progress.error is None:
            tail = "\n".join(self.progress.log[-20:])
            self.progress.error = _("The background process stopped with exit code {code}.").format(code=exitCode) + (
                "\n" + tail if tail else "")
        if self.finishedCallback is not None:
            self.finishedCallback(self)

    def isRunning(self):
        return self.runner.isRunning()

    def cancel(self):
        """Ask the child to checkpoint and stop; kill the process tree if it does not in time."""
        if not self.runner.isRunning():
            return
        self.cancelled = True
        if self.stopFile is not None:
            self.stopFile.parent.mkdir(parents=True, exist_ok=True)
            self.stopFile.write_text("stop requested by the ReCoKD panel\n")
        self.runner.terminate()
        self.schedule(self.graceMs, self._killIfRunning)

    def _killIfRunning(self):
        if self.runner.isRunning():
            self.killed = True
            self.progress.log.append(_("The process did not stop in time; it was killed."))
            self.runner.kill()
