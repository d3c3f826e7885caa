"""One convention for every ``recokd`` command: exit codes, errors said once, warnings, signals.

===========  ==============================================================================
exit code    meaning
===========  ==============================================================================
0            done
1            a failure while running: a full disk, no memory, an unexpected error (a bug)
2            bad input: a file, option, model or destination that cannot be used (argparse's
             usage errors too); nothing was written
130          interrupted (Ctrl+C / SIGINT)
143          stopped by SIGTERM (after saying so and how to resume; a training run writes its
             checkpoint first)
===========  ==============================================================================

:func:`run_command` runs a command's ``job(reporter)`` under this convention:

* every error reaches the user **once**: one ``error`` event (the bar prints it on stderr as
  ``[stage] error: ...``; ``--progress json`` puts it on stdout) and, where the reporter prints
  nothing to the terminal (``none``, ``json``), one ``recokd STAGE: error: ...`` line on stderr;
  errors a library already reported (``exc.recokd_reported``) are not reported again;
* code a model file names and nobody trusted (:class:`~ReCoKDLib.trust.UntrustedCodeError`): the
  ``error`` event also carries ``entry_point`` and ``entry_point_source``
  (:func:`ReCoKDLib.trust.error_fields`), so that the Slicer panel can ask whether to trust that name;
* library warnings about inputs (:class:`~ReCoKDLib.data.io.InputWarning`: NaN voxels replaced,
  implausible spacing, classes left out, a stale lock) become ``warning`` events;
* SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``, so clean-ups that handle Ctrl+C
  run too) except while a training loop holds its own graceful handler; a training run stopped
  that way returns normally, and the command still ends with 143 and the resume command;
* an out-of-memory error says how much was asked for and what to lower;
* an unexpected exception is one line, and its traceback is written to a file named in it
  (``RECOKD_TRACEBACK=1`` prints it on stderr as well);
* ``lock``: the run folder is held by :class:`~ReCoKDLib.runlock.RunFolderLock` for the job.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Iterator

from ReCoKDLib import stopping
from ReCoKDLib.progress import make_reporter

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "Terminated",
           "run_command", "resume_command", "memory_message", "exit_code_for"]

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143

#: what to lower when memory runs out, for commands that do not say
DEFAULT_MEMORY_HINT = "close other programs, or run on a machine with more memory"


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (raised by the runner's handler)."""


def resume_command(argv: list[str] | None = None, flag: str | None = "--resume") -> str:
    """The command line that continues this run: the same arguments, plus ``flag`` when missing."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if flag and flag not in argv:
        argv.append(flag)
    return shlex.join(["recokd", *argv])


_ALLOCATOR = re.compile(r"(?:you tried to allocate|Tried to allocate)\s+([0-9.]+)\s*(bytes|[KMGTP]i?B)?", re.I)


def _size(amount: float, unit: str | None) -> str:
    scale = {"bytes": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30,
             "tb": 2**40, "tib": 2**40, "pb": 2**50, "pib": 2**50}.get((unit or "bytes").lower(), 1)
    n = amount * scale
    for name in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.3g} {name}"
        n /= 1024
    return f"{n:.3g} PiB"


def memory_message(exc: BaseException) -> str | None:
    """``"out of memory: ..."`` with the size asked for, for numpy/Python ``MemoryError``, torch's
    CPU allocator and CUDA out-of-memory errors; ``None`` for other exceptions."""
    text = str(exc).strip()
    if isinstance(exc, MemoryError):  # numpy: "Unable to allocate 7.3 PiB for an array with shape ..."
        first = text.splitlines()[0] if text else "An allocation failed"
        return f"out of memory: {first[:1].lower()}{first[1:]}"
    is_cuda_oom = type(exc).__name__ == "OutOfMemoryError"
    if isinstance(exc, RuntimeError) and (is_cuda_oom or "DefaultCPUAllocator" in text or "out of memory" in text.lower()):
        match = _ALLOCATOR.search(text)
        where = "GPU" if is_cuda_oom or "CUDA" in text else "CPU"
        asked = f" an allocation of {_size(float(match.group(1)), match.group(2))} failed on the {where}" if match else \
            f" the {where} ran out ({text.splitlines()[0][:160]})"
        return f"out of memory:{asked}"
    return None


def exit_code_for(exc: BaseException) -> int:
    """The convention's exit code of an exception that ended a command."""
    if isinstance(exc, Terminated):
        return EXIT_TERMINATED
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, ValueError):
        return EXIT_BAD_INPUT
    return EXIT_FAILURE


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread (handlers installed by a training loop
    take over while they are set, and give this one back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        stopping.note_signal(signum)
        raise Terminated(stopping.signal_name(signum))

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _warnings_as_events(reporter, stage: str, progress: str) -> Iterator[None]:
    from ReCoKDLib.data.io import InputWarning

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, InputWarning):
            reporter.warning(stage, str(message))
            if progress in ("none", "json"):
                print(f"recokd {stage}: warning: {message}", file=sys.stderr, flush=True)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", InputWarning)
        warnings.showwarning = show
        yield


def _traceback_file(stage: str, exc: BaseException) -> str | None:
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if os.environ.get("RECOKD_TRACEBACK"):
        print(text, file=sys.stderr, end="")
    try:
        fd, path = tempfile.mkstemp(prefix=f"recokd-{stage}-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"recokd {' '.join(sys.argv[1:])}\n\n{text}")
        return path
    except OSError:
        return None


def run_command(args: argparse.Namespace, stage: str, job: Callable[[Any], None], *,
                resume_hint: str | None = None, memory_hint: str | None = None,
                lock: str | os.PathLike | None = None) -> int:
    """Run ``job(reporter)`` under the CLI's convention (module docstring); returns the exit code.

    Args:
        args: the parsed arguments (``args.progress`` picks the reporter; ``"none"`` without it).
        stage: the stage named in events and messages.
        resume_hint: how to continue after an interruption (default: run the same command again).
        memory_hint: what to lower when memory runs out (``"--sw-batch-size, --roi"``).
        lock: a run folder to hold for the whole job (:class:`~ReCoKDLib.runlock.RunFolderLock`);
            not taken by the non-zero ranks of a ``torchrun`` job.
    """
    progress = getattr(args, "progress", "none") or "none"
    reporter = make_reporter(progress)
    resume = resume_hint or "run the same command again to start over"
    stopping.forget()
    code, message, reported, fields = EXIT_OK, None, False, {}
    try:
        with _sigterm_raises(), _warnings_as_events(reporter, stage, progress), _run_folder(lock):
            job(reporter)
        if stopping.received(signal.SIGTERM):  # a training loop stopped gracefully (checkpoint written)
            code = EXIT_TERMINATED
            reporter.log(stage, f"stopped by SIGTERM; {resume}")
            if progress in ("none", "json"):
                print(f"recokd {stage}: stopped by SIGTERM; {resume}", file=sys.stderr, flush=True)
    except BaseException as exc:  # noqa: BLE001 - every way out gets the convention's code and one message
        if isinstance(exc, SystemExit):
            raise
        code = exit_code_for(exc)
        reported = bool(getattr(exc, "recokd_reported", False))
        memory = memory_message(exc)
        if isinstance(exc, Terminated):
            message = f"stopped by SIGTERM; {resume}"
        elif isinstance(exc, KeyboardInterrupt):
            message = f"interrupted; {resume}"
        elif memory is not None:
            code, message = EXIT_FAILURE, f"{memory}. Lower {memory_hint or DEFAULT_MEMORY_HINT}"
        elif isinstance(exc, (ValueError, OSError)):
            message = str(exc) or type(exc).__name__
            from ReCoKDLib.trust import error_fields

            fields = error_fields(exc)  # refused code: the entry point to trust, for front ends
        else:
            where = _traceback_file(stage, exc)
            message = (f"unexpected {type(exc).__name__}: {exc}" + (f" (the traceback is in {where}; please "
                       "include it when you report this)" if where else ""))
    finally:
        if message is not None:
            if not reported:
                reporter.error(stage, message, **fields)
            if progress in ("none", "json"):
                print(f"recokd {stage}: error: {message}", file=sys.stderr, flush=True)
        reporter.close()
    return code


@contextlib.contextmanager
def _run_folder(lock: str | os.PathLike | None) -> Iterator[None]:
    if lock is None or os.environ.get("RANK", "0") != "0":
        yield
        return
    from ReCoKDLib.outputs import check_destination
    from ReCoKDLib.runlock import RunFolderLock

    check_destination(lock, "--out", folder=True)
    with RunFolderLock(lock, command=shlex.join(["recokd", *sys.argv[1:]])):
        yield
