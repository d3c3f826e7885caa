"""Many cases with one model: ``recokd segment MODEL INPUT [INPUT ...] OUT_DIR``.

* :func:`expand_inputs` turns what a user types into cases: image files, DICOM series folders,
  folders holding either, glob patterns (``scans/*.nii.gz``, ``**`` too) and text lists (``.txt``,
  one entry per line, ``#`` comments, paths relative to the list), in the order given, duplicates
  dropped, each with a unique case id;
* :func:`segment_cases` segments them one after the other with a model loaded once: a progress bar
  over cases, a failing case is reported and the rest go on, and ``summary.csv`` (per case: status,
  seconds, volume of each segment in ml, the error) is rewritten after every case, so an
  interrupted run keeps the rows of the cases it finished.

No CLI parsing here (:mod:`ReCoKDLib.commands.segment` calls it); no torch until a case runs.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ReCoKDLib.checkpoint import atomic_write_text
from ReCoKDLib.data.io import IMAGE_SUFFIXES, image_suffix

__all__ = ["BatchInputError", "Case", "CaseResult", "expand_inputs", "is_batch", "segment_cases", "summary_csv",
           "LIST_SUFFIXES", "STAGE"]

STAGE = "batch"
#: a text file of inputs, one per line
LIST_SUFFIXES = (".txt", ".lst", ".list")
_GLOB_CHARS = set("*?[")


class BatchInputError(ValueError):
    """An input that names nothing segmentable (missing path, empty glob or folder, unreadable list)."""


@dataclass(frozen=True)
class Case:
    """One volume to segment: ``image`` is an image file or a DICOM series folder."""

    case_id: str
    image: Path

    @property
    def is_dicom(self) -> bool:
        return self.image.is_dir()


@dataclass
class CaseResult:
    """What became of a case: ``status`` ``"ok"`` or ``"failed"`` (``error`` says why, ``kind``
    ``"input"`` for bad input, ``"run"`` for other failures), the outputs and the volumes in ml."""

    case: Case
    status: str
    seconds: float = 0.0
    output: Path | None = None
    dicom_seg: Path | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)
    error: str = ""
    kind: str = ""


def _is_dicom_folder(folder: Path) -> bool:
    from ReCoKDLib.data.io import dicom_series_files

    try:
        return bool(dicom_series_files(folder))
    except ValueError:
        return False


def _folder_cases(folder: Path) -> list[Path]:
    """A DICOM series folder is one case; otherwise its image files and series sub-folders."""
    if _is_dicom_folder(folder):
        return [folder]
    entries = sorted(folder.iterdir())
    found = [p for p in entries if p.is_file() and image_suffix(p) in IMAGE_SUFFIXES and not p.name.startswith(".")]
    found += [p for p in entries if p.is_dir() and _is_dicom_folder(p)]
    if not found:
        raise BatchInputError(f"{folder} holds no image file (.nii.gz, .nii, .nrrd, .mha) and no DICOM series")
    return sorted(found)


def _expand_one(entry: str, base: Path, seen_lists: set[Path]) -> list[Path]:
    text = entry.strip()
    if _GLOB_CHARS & set(text):
        pattern = text if os.path.isabs(text) else str(base / text)
        hits = [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))]
        if not hits:
            raise BatchInputError(f"the pattern {text!r} matches nothing")
        return [p for hit in hits for p in (_folder_cases(hit) if hit.is_dir() else [hit])]
    path = Path(os.path.expanduser(text))
    path = path if path.is_absolute() else base / path
    if path.is_dir():
        return _folder_cases(path)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        resolved = path.resolve()
        if resolved in seen_lists:
            raise BatchInputError(f"the list {path} includes itself")
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise BatchInputError(f"cannot read the list {path}: {exc}") from None
        entries = [line.split("#", 1)[0].strip() for line in lines]
        out = [p for e in entries if e for p in _expand_one(e, path.parent, seen_lists | {resolved})]
        if not out:
            raise BatchInputError(f"the list {path} names no input")
        return out
    if path.is_file():
        return [path]
    raise BatchInputError(f"input {text} does not exist")


def _case_id(path: Path) -> str:
    name = path.name
    suffix = image_suffix(path)
    stem = name[: -len(suffix)] if suffix and not path.is_dir() else name
    return stem or "case"


def expand_inputs(entries: Iterable[str | os.PathLike], base: str | os.PathLike = ".") -> list[Case]:
    """The cases named by ``entries`` (see the module docstring), relative paths against ``base``.

    Raises:
        BatchInputError: an entry names nothing (the message says which), or no case at all.
    """
    paths: list[Path] = []
    for entry in entries:
        for path in _expand_one(str(entry), Path(base), set()):
            if path.resolve() not in {p.resolve() for p in paths}:
                paths.append(path)
    if not paths:
        raise BatchInputError("no input to segment")
    ids: dict[str, int] = {}
    cases = []
    for path in paths:
        case_id = _case_id(path)
        if case_id in ids:  # two scans called ct.nii.gz in different folders: prefix the folder
            case_id = f"{path.parent.name}_{case_id}" if path.parent.name else case_id
        while case_id in ids:
            case_id = f"{case_id}_{len(ids)}"
        ids[case_id] = 1
        cases.append(Case(case_id, path))
    return cases


def is_batch(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> bool:
    """True when the inputs name several cases (several entries, a glob, a list, a folder that is
    not itself a DICOM series) or ``out`` is a folder: ``recokd segment`` then writes one label
    map per case into ``out``."""
    if len(inputs) != 1 or str(out).endswith(("/", os.sep)) or Path(out).is_dir():
        return True
    text = str(inputs[0])
    path = Path(os.path.expanduser(text))
    return bool(_GLOB_CHARS & set(text)) or path.suffix.lower() in LIST_SUFFIXES or (
        path.is_dir() and not _is_dicom_folder(path))


def _volumes_ml(labels: np.ndarray, spacing: Sequence[float], class_names: Sequence[str]) -> dict[str, float]:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(class_names))
    return {name: round(float(counts[i]) * voxel_ml, 3) for i, name in enumerate(class_names) if i}


def summary_csv(results: Sequence[CaseResult], class_names: Sequence[str]) -> str:
    """The summary as CSV text: one row per case, one ``<class>_ml`` column per class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    classes = list(class_names[1:])
    writer.writerow(["case", "input", "status", "seconds", "output", "dicom_seg", *[f"{c}_ml" for c in classes],
                     "error"])
    for r in results:
        volumes = [f"{r.volumes_ml[c]:.3f}" if c in r.volumes_ml else "" for c in classes]
        writer.writerow([r.case.case_id, str(r.case.image), r.status, f"{r.seconds:.3f}", str(r.output or ""),
                         str(r.dicom_seg or ""), *volumes, r.error])
    return buffer.getvalue()


def segment_cases(model, cases: Sequence[Case], out_dir: str | os.PathLike, *, suffix: str = ".nii.gz",
                  summary_path: str | os.PathLike | None = None, dicom_seg_dir: str | os.PathLike | None = None,
                  reporter=None, after_case: Callable[[Case, Any], None] | None = None,
                  **segment_kwargs: Any) -> list[CaseResult]:
    """Segment every case with ``model`` (a loaded model: it is not loaded again per case).

    Args:
        out_dir: receives ``<case>_seg<suffix>`` per case and, by default, ``summary.csv``.
        dicom_seg_dir: also write ``<case>_seg.dcm`` there for cases that are DICOM series.
        after_case: called with ``(case, SegmentationResult)`` after a case succeeded (pictures).
        segment_kwargs: passed to :func:`ReCoKDLib.infer.segment_file` (roi, mirror, device, ...).

    Returns:
        one :class:`CaseResult` per case, in order. ``KeyboardInterrupt`` stops the batch after
        the summary of the finished cases is written.
    """
    from ReCoKDLib.infer import segment_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = Path(summary_path) if summary_path else out_dir / "summary.csv"
    class_names = list(model.card.classes)
    results: list[CaseResult] = []
    if reporter is not None:
        reporter.start(STAGE, total=len(cases), message=f"{len(cases)} case(s) -> {out_dir}")
    for index, case in enumerate(cases):
        started = time.perf_counter()
        output = out_dir / f"{case.case_id}_seg{suffix}"
        try:
            if output.resolve() == case.image.resolve():
                raise ValueError(f"the output {output} would overwrite the input")
            result = segment_file(model, case.image, output, **segment_kwargs)
            row = CaseResult(case, "ok", time.perf_counter() - started, output,
                             volumes_ml=_volumes_ml(result.labels, result.geometry.spacing, class_names))
            if dicom_seg_dir is not None and case.is_dicom:
                from ReCoKDLib.data.dicom_seg import write_dicom_seg

                written = write_dicom_seg(result.labels, result.geometry, case.image, class_names,
                                          Path(dicom_seg_dir) / f"{case.case_id}_seg.dcm",
                                          colors=model.card.colors or None,
                                          algorithm=Path(str(getattr(model, "source", "") or "ReCoKD model")).name)
                row.dicom_seg = written.path
            if after_case is not None:
                after_case(case, result)
            row.seconds = time.perf_counter() - started
        except (ValueError, OSError, RuntimeError) as exc:
            kind = "input" if isinstance(exc, ValueError) else "run"
            row = CaseResult(case, "failed", time.perf_counter() - started, error=str(exc).strip().splitlines()[0]
                             if str(exc).strip() else type(exc).__name__, kind=kind)
            if reporter is not None:
                reporter.warning(STAGE, f"{case.case_id}: failed ({row.error}); going on with the next case")
        except KeyboardInterrupt:
            atomic_write_text(summary_path, summary_csv(results, class_names))
            raise
        results.append(row)
        atomic_write_text(summary_path, summary_csv(results, class_names))
        if reporter is not None:
            reporter.progress(STAGE, index + 1, len(cases), case=case.case_id, status=row.status)
    return results
