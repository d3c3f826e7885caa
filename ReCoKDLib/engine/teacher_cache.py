"""A frozen teacher's outputs computed once per training case, stored compactly, read by the sampler.

Distilling from a large frozen teacher runs the teacher on every training patch: HD-BET costs ~45 s
per head and forward pass on one CPU thread, far more than the student's step. When the data are
fixed the teacher's outputs are too, so :func:`attach_teacher_targets` computes them **once per
training case, on the whole preprocessed volume**, and the sampler crops and augments them with
each patch (``data.sampling.TeacherTargets``).

What is stored, per case (``<root>/<key>/``, written into a temporary folder and renamed into
place, so a run killed with ``kill -9`` leaves either a whole entry or none; a half-written one is
never read, and a later run computes the missing entries only):

* ``logits.npy``: ``(K, D, H, W)`` float16 on the case's grid;
* ``feature_<l>.npy``: the features at tap ``l`` (stride ``s_l``), ``(C_l, ceil(D/s_l), ...)``
  float16, only when a KD method reads features (logit KD and pseudo-labels need logits only);
* ``meta.json``: the key's parts, how the outputs were computed, the seconds it took.

**Cost.** ``2 * (K + sum_l C_l / (s_l[0] s_l[1] s_l[2]))`` bytes per voxel of each training case, on
disk and memory-mapped while training (:func:`bytes_per_voxel`); HD-BET with ReCo-KD: ~18 bytes per
voxel, ~40 MB per head at 1.5 mm; logits only: 4 bytes per voxel. Plus one teacher pass per case.

**Key.** SHA-256 of: the cache format version, the teacher's hash (its file's SHA-256), the
preprocessed volume's own bytes and the case's source-file hash, the preprocessing record
(spacing, normalisation), the tap names and how the volume is run (whole or sliding window, its
size and overlap). Any change of teacher, case or preprocessing gives a new key: stale outputs are
never read. The cache may live in the run folder (default) or be shared (``teacher_cache_dir``).

**Exactness.** A volume of at most :data:`WHOLE_VOLUME_VOXELS` voxels is run in one pass (padded
to the teacher's size step with the volume's minimum, the padding cropped off): the stored logits
are exactly the teacher's output on the whole volume, as at inference (up to float16). A larger
volume runs by Gaussian-weighted sliding window (MONAI, features blended at their own resolution):
**not exact** at the seams. Either way the targets differ from a live teacher in two stated ways:
the live teacher sees only the patch (zero context beyond its border; instance-normalised networks
such as HD-BET see patch statistics) and the intensity-augmented image, whereas cached targets come
from the whole, un-augmented volume and follow the patch's spatial augmentation by resampling
(bilinear) — the teacher's prediction of that anatomy, not of that noise.

``mode`` (``TrainConfig.teacher_outputs``): ``"cache"`` always caches (sliding window where
needed), ``"live"`` runs the teacher on every patch, ``"auto"`` (default) caches when every
training case fits one exact whole-volume pass and that pass works, else stays live and says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ReCoKDLib.data.sampling import CaseSet, TeacherTargets
from ReCoKDLib.engine.parts import flush_denormals

__all__ = [
    "CACHE_VERSION",
    "MODES",
    "WHOLE_VOLUME_VOXELS",
    "TeacherCacheError",
    "CachePlan",
    "TeacherOutputCache",
    "volume_outputs",
    "bytes_per_voxel",
    "attach_teacher_targets",
    "choose_mode",
]

#: changes whenever the stored layout changes, so entries of an older layout are never read
CACHE_VERSION = 1
MODES = ("auto", "cache", "live")
#: volumes up to this many voxels run in one exact pass (a 1.5 mm head: ~2.5 M; 203^3 = 8.4 M)
WHOLE_VOLUME_VOXELS = 2**23

#: ``forward(x (1, C, D, H, W)) -> (logits (1, K, D', H', W'), [features (1, C_l, ...)])`` without gradients
TeacherForward = Callable[[Tensor], "tuple[Tensor, list[Tensor]]"]


class TeacherCacheError(ValueError):
    """The teacher's outputs cannot be cached as asked (a shape the teacher cannot take, a cache folder)."""


@dataclass(frozen=True)
class CachePlan:
    """How a teacher's outputs are computed and keyed.

    Attributes:
        teacher_sha256: the teacher's identity (part of the key).
        taps: teacher module names whose features are stored (empty: logits only).
        strides: per tap its stride ``(s_D, s_H, s_W)`` relative to the input.
        window: sliding window ``(D, H, W)`` for volumes above ``max_whole_voxels`` (the teacher's patch).
        size_step: inputs are padded to a multiple of this per axis (the network's total stride).
        overlap: sliding-window overlap.
        max_whole_voxels: volumes up to this size run in one exact pass.
    """

    teacher_sha256: str
    taps: tuple[str, ...]
    strides: tuple[tuple[int, int, int], ...]
    window: tuple[int, int, int]
    size_step: tuple[int, int, int] = (1, 1, 1)
    overlap: float = 0.5
    max_whole_voxels: int = WHOLE_VOLUME_VOXELS

    def whole(self, shape: Sequence[int]) -> bool:
        """Whether a volume of ``shape`` ``(D, H, W)`` runs in one pass."""
        return int(np.prod([int(s) for s in shape])) <= self.max_whole_voxels

    def inference(self, shape: Sequence[int]) -> dict[str, Any]:
        """How a volume of ``shape`` is run (part of the key and of the records)."""
        if self.whole(shape):
            return {"pass": "whole volume", "exact": True, "size_step": list(self.size_step)}
        return {"pass": "sliding window", "exact": False, "window": list(self.window), "overlap": self.overlap,
                "size_step": list(self.size_step)}

    def key(self, case_digest: str, preprocessing: Mapping[str, Any], shape: Sequence[int]) -> str:
        """The entry's name: SHA-256 (first 32 hex digits) of every part the outputs depend on."""
        parts = {"version": CACHE_VERSION, "teacher": self.teacher_sha256, "case": case_digest,
                 "preprocessing": preprocessing, "taps": list(self.taps),
                 "strides": [list(s) for s in self.strides], "inference": self.inference(shape)}
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def bytes_per_voxel(num_outputs: int, channels: Sequence[int], strides: Sequence[Sequence[int]]) -> float:
    """Bytes the cache takes per input voxel: float16 logits plus each tapped feature map."""
    return 2.0 * (num_outputs + sum(c / float(np.prod(s)) for c, s in zip(channels, strides)))


# ---------------------------------------------------------------------------------------------
# Computing one volume


def _pad_to_step(x: Tensor, step: Sequence[int]) -> Tensor:
    """``x`` ``(1, C, D, H, W)`` padded at the end of each axis to a multiple of ``step`` with its minimum."""
    size = x.shape[2:]
    target = [-(-int(s) // int(m)) * int(m) for s, m in zip(size, step)]
    if list(size) == target:
        return x
    pads: list[int] = []
    for s, t in zip(reversed(size), reversed(target)):
        pads += [0, t - int(s)]
    fill = float(x.min())
    return F.pad(x - fill, pads, value=0.0) + fill


def _crop_outputs(logits: Tensor, features: Sequence[Tensor], shape: Sequence[int],
                  strides: Sequence[Sequence[int]]) -> tuple[Tensor, list[Tensor]]:
    d, h, w = (int(s) for s in shape)
    if any(a < b for a, b in zip(logits.shape[-3:], (d, h, w))):
        raise TeacherCacheError(f"the teacher's logits {tuple(logits.shape)} do not cover the input {tuple(shape)}")
    cropped = []
    for feature, stride in zip(features, strides):
        size = [-(-n // s) for n, s in zip((d, h, w), stride)]
        if any(a < b for a, b in zip(feature.shape[-3:], size)):
            raise TeacherCacheError(f"a teacher feature map {tuple(feature.shape)} is smaller than the input / stride "
                                    f"{stride} = {size}: the stride does not hold on the whole volume")
        cropped.append(feature[..., :size[0], :size[1], :size[2]])
    return logits[..., :d, :h, :w], cropped


@torch.no_grad()
def volume_outputs(forward: TeacherForward, image: Tensor, plan: CachePlan,
                   device: torch.device | str = "cpu") -> tuple[Tensor, list[Tensor], bool]:
    """The teacher's logits and tapped features on one whole preprocessed volume.

    Args:
        forward: the teacher's pass (``DistillationPair.teacher_forward``): logits and the features
            at ``plan.taps`` (ignored when ``plan.taps`` is empty).
        image: ``(C, D, H, W)`` preprocessed volume.
        plan: taps, strides, size step, window.
        device: where the teacher runs; results come back on the CPU.

    Returns:
        ``(logits (K, D, H, W), [features (C_l, ceil(D/s_l), ...)], exact)`` float32 on the CPU;
        ``exact`` is ``False`` for a sliding-window pass.

    Raises:
        TeacherCacheError: the teacher's outputs do not match the input's size (a network that is
            not fully convolutional on this size).
    """
    shape = tuple(int(s) for s in image.shape[1:])
    n_taps = len(plan.taps)
    x = _pad_to_step(image[None].float(), plan.size_step)
    if plan.whole(shape):
        logits, features = forward(x.to(device))
        logits = logits.float().cpu()
        features = [f.float().cpu() for f in features[:n_taps]] if n_taps else []
        exact = True
    else:
        from monai.inferers import sliding_window_inference

        def predictor(window: Tensor):
            out, feats = forward(window)
            return (out.float(), *[f.float() for f in feats[:n_taps]]) if n_taps else out.float()

        result = sliding_window_inference(x, roi_size=plan.window, sw_batch_size=1, predictor=predictor,
                                          overlap=plan.overlap, mode="gaussian", sw_device=torch.device(device),
                                          device=torch.device("cpu"))
        outputs = list(result) if isinstance(result, (tuple, list)) else [result]
        logits, features, exact = outputs[0], outputs[1:], False
    if logits.dim() != 5:
        raise TeacherCacheError(f"the teacher's logits must be (1, K, D, H, W), got {tuple(logits.shape)}")
    logits, features = _crop_outputs(logits, features, shape, plan.strides)
    return logits[0], [f[0] for f in features], exact


# ---------------------------------------------------------------------------------------------
# The store


class TeacherOutputCache:
    """Cached teacher outputs on disk: ``<root>/<key>/{logits.npy, feature_<l>.npy, meta.json}``.

    An entry is written into ``<root>/.<key>.<pid>.tmp`` and renamed into place once complete;
    :meth:`load` reads only complete entries (``meta.json`` is written last and names every array).
    Temporary folders left by a killed process are removed by the next :meth:`clean_stale`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> tuple[TeacherTargets, dict[str, Any]] | None:
        """The entry's targets (memory-mapped float16) and its meta, or ``None`` (absent or unreadable)."""
        folder = self.path(key)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("cache_version") != CACHE_VERSION or meta.get("key") != key:
                return None
            logits = np.load(folder / "logits.npy", mmap_mode="r")
            features = [np.load(folder / name, mmap_mode="r") for name in meta["features"]]
            targets = TeacherTargets(logits, features, [tuple(s) for s in meta["strides"]])
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            return None
        return targets, meta

    def store(self, key: str, logits: Tensor, features: Sequence[Tensor], strides: Sequence[Sequence[int]],
              meta: Mapping[str, Any]) -> tuple[TeacherTargets, dict[str, Any]]:
        """Write an entry atomically (float16) and return it as :meth:`load` reads it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TeacherCacheError(f"cannot create the teacher-output cache {self.root}: {exc}") from exc
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            np.save(tmp / "logits.npy", logits.to(torch.float16).numpy())
            names = []
            for level, feature in enumerate(features):
                names.append(f"feature_{level}.npy")
                np.save(tmp / names[-1], feature.to(torch.float16).numpy())
            record = {**dict(meta), "key": key, "cache_version": CACHE_VERSION, "features": names,
                      "strides": [list(s) for s in strides]}
            (tmp / "meta.json").write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
            target = self.path(key)
            if target.exists():  # written meanwhile by another process (same key: same content)
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise TeacherCacheError(f"cannot write the teacher-output cache {self.root}: {exc} (choose another "
                                    "folder with teacher_cache_dir / --teacher-cache-dir, or free disk space)") from exc
        loaded = self.load(key)
        if loaded is None:
            raise TeacherCacheError(f"the teacher-output cache entry {self.path(key)} cannot be read back")
        return loaded

    def clean_stale(self) -> int:
        """Remove temporary folders whose writing process is gone (a ``kill -9``); returns how many."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for tmp in self.root.glob(".*.tmp"):
            try:
                pid = int(tmp.name.rsplit(".", 2)[-2])
                os.kill(pid, 0)
                alive = pid != os.getpid()
            except (ValueError, IndexError):
                alive = False
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
            if not alive:
                shutil.rmtree(tmp, ignore_errors=True)
                removed += 1
        return removed


# ---------------------------------------------------------------------------------------------
# A case set with its teacher's outputs


def _case_digest(image: np.ndarray) -> str:
    """SHA-256 of a preprocessed volume's shape, dtype and bytes."""
    digest = hashlib.sha256(f"{image.shape}{image.dtype}".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def choose_mode(requested: str, plan: CachePlan, shapes: Sequence[Sequence[int]]) -> tuple[str, str]:
    """``("cache" | "live", why)`` for ``requested`` in :data:`MODES` and the training cases' ``shapes``."""
    if requested not in MODES:
        raise TeacherCacheError(f"teacher outputs must be one of {MODES}, got {requested!r}")
    if requested == "live":
        return "live", "asked for (the teacher runs on every patch)"
    big = [tuple(s) for s in shapes if not plan.whole(s)]
    if requested == "cache":
        return "cache", ("asked for; " + (f"{len(big)} case(s) larger than {plan.max_whole_voxels} voxels run by sliding "
                                          "window (not exact)" if big else "every case in one exact pass"))
    if big:
        return "live", (f"{len(big)} training case(s) are too large for one exact teacher pass (e.g. {big[0]}, > "
                        f"{plan.max_whole_voxels} voxels); --teacher-outputs cache caches them by sliding window")
    return "cache", "every training case fits one exact whole-volume teacher pass"


def attach_teacher_targets(case_set: CaseSet, forward: TeacherForward, plan: CachePlan, cache_dir: str | os.PathLike,
                           device: torch.device | str = "cpu", reporter: Any = None,
                           stage: str = "teacher-cache") -> tuple[CaseSet, dict[str, Any]]:
    """Every case of ``case_set`` with its teacher outputs (computed once, then read from the cache).

    Args:
        case_set: preprocessed cases (their own bytes and ``source_hashes`` key the entries).
        forward: the teacher's pass (see :func:`volume_outputs`).
        plan: what to compute and how (:class:`CachePlan`).
        cache_dir: the cache's folder.
        device: where the teacher runs.
        reporter: a ``progress.Reporter``: one bar over the cases (``stage``).

    Returns:
        ``(case set whose cases carry TeacherTargets, record)``; the record (for the model card)
        says ``mode``, ``exact``, how each case was run, ``bytes``, ``computed``/``reused`` cases,
        ``seconds`` of teacher passes and the folder.

    Raises:
        TeacherCacheError: the teacher cannot take a case's size, or the cache cannot be written.
    """
    cache = TeacherOutputCache(cache_dir)
    cache.clean_stale()
    preprocessing = {"spacing": list(case_set.spacing), "normalization": dict(case_set.normalization)}
    cases, computed, seconds, exact, passes = [], 0, 0.0, True, set()
    total = len(case_set.cases)
    if reporter is not None:
        reporter.start(stage, total=total, message=f"teacher outputs of {total} case(s) in {cache.root}")
    for index, case in enumerate(case_set.cases):
        shape = case.shape
        source = {**preprocessing, "source": case_set.source_hashes.get(case.case_id, "")}
        key = plan.key(_case_digest(np.asarray(case.image)), source, shape)
        loaded = cache.load(key)
        from_cache = loaded is not None
        if loaded is None:
            t0 = time.perf_counter()
            image = torch.from_numpy(np.array(case.image, dtype=np.float32))
            with flush_denormals():  # subnormal activations slow a CPU pass down 30x (engine.parts)
                logits, features, case_exact = volume_outputs(forward, image, plan, device)
            spent = time.perf_counter() - t0
            seconds += spent
            computed += 1
            loaded = cache.store(key, logits, features, plan.strides, {
                "case_id": case.case_id, "teacher_sha256": plan.teacher_sha256, "taps": list(plan.taps),
                "shape": list(shape), "inference": plan.inference(shape), "exact": case_exact, "seconds": spent,
                "preprocessing": preprocessing})
        targets, meta = loaded
        exact = exact and bool(meta.get("exact", False))
        passes.add(plan.inference(shape)["pass"])
        cases.append(replace(case, teacher=targets))
        if reporter is not None:
            reporter.progress(stage, index + 1, total,
                              message=f"{case.case_id} ({'from the cache' if from_cache else 'computed'})")
    out = case_set.with_cases(cases)
    nbytes = sum(c.teacher.nbytes for c in cases)  # type: ignore[union-attr]
    record = {"mode": "cache", "exact": exact, "inference": sorted(passes), "taps": list(plan.taps), "bytes": nbytes,
              "cases": total, "computed": computed, "reused": total - computed, "seconds": round(seconds, 2),
              "dir": str(cache.root)}
    if reporter is not None:
        reporter.done(stage, path=str(cache.root), message=f"teacher outputs: {computed} computed, {total - computed} "
                      f"from the cache, {nbytes / 2**20:.1f} MiB{'' if exact else ' (sliding window: not exact)'}")
    return out, record
