"""A model's sliding-window overlap, chosen by measured agreement with a reference.

Overlap sets how many windows a volume needs: a 64^3 window over Colin27 at 1.5 mm (118 x 143 x 121)
slides 36 times at overlap 0.5, 27 at 0.25, 12 at 0.1 and 12 at 0. Fewer windows are faster, but
the Gaussian blending of overlapping windows also smooths seams, and how much that matters depends
on the model. So the overlap a model's card names (``ModelCard.inference["overlap"]``, what
``recokd segment`` uses) is measured, not guessed:

1. :func:`measure_overlaps` segments calibration volumes at each candidate overlap through
   :func:`ReCoKDLib.infer.segment_volume` (the path ``recokd segment`` runs: backend, window and
   post-processing as there) and scores each against reference label maps of the same volumes
   (for a student: its teacher's segmentation of its own *training* volumes; never the volumes it
   is evaluated on);
2. :func:`choose_overlap` keeps the candidate with the fewest windows among those whose mean Dice
   is within ``tolerance`` of the best candidate's (ties: the higher Dice). The default tolerance,
   0.005 mean Dice, is the accuracy the project lets a faster Segment setting cost (the speed
   target for the CT student asks for mean Dice within 0.005 of its PyTorch fp32 result);
3. :func:`write_overlap` writes the choice into a copy of the model file's card, with the whole
   measurement (``card.metrics["overlap_choice"]``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["CANDIDATES", "TOLERANCE", "OverlapTrial", "label_dice", "measure_overlaps", "choose_overlap",
           "write_overlap"]

#: overlaps tried, most to least
CANDIDATES = (0.5, 0.25, 0.1, 0.0)
#: how much mean Dice against the reference a smaller overlap may cost
TOLERANCE = 0.005


@dataclass(frozen=True)
class OverlapTrial:
    """One candidate overlap measured on the calibration volumes.

    Attributes:
        overlap: the sliding-window overlap.
        dice: mean over volumes of the mean Dice over foreground classes against the reference.
        dice_per_volume: ``{volume: Dice}``.
        windows: sliding windows over all volumes (what the overlap costs; deterministic).
        seconds: end-to-end seconds over all volumes (one run each; noisy, reported only).
    """

    overlap: float
    dice: float
    dice_per_volume: dict[str, float]
    windows: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def label_dice(prediction: np.ndarray, reference: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes ``1..num_classes-1`` present in either label map
    (``(D, H, W)`` integers of the same shape); 1.0 when neither has any foreground."""
    if prediction.shape != reference.shape:
        raise ValueError(f"label maps of different shapes {prediction.shape} and {reference.shape}")
    scores = []
    for c in range(1, num_classes):
        p, r = prediction == c, reference == c
        denom = int(p.sum()) + int(r.sum())
        if denom:
            scores.append(2.0 * int(np.logical_and(p, r).sum()) / denom)
    return float(np.mean(scores)) if scores else 1.0


def _windows(info: dict[str, Any], overlap: float) -> int:
    """Sliding windows ``segment_volume`` ran, from its ``info`` (computed region and window)."""
    from ReCoKDLib.infer import window_starts

    region = info.get("computed_region")
    if region is None:
        return 0
    count = 1
    for (a, b), w in zip(region, info["window"]):
        count *= len(window_starts(int(b - a), int(w), overlap))
    return count


def measure_overlaps(model: Any, volumes: Sequence[tuple[str, np.ndarray, Any]], references: Sequence[np.ndarray],
                     candidates: Sequence[float] = CANDIDATES, device: str = "cpu", reporter: Any = None,
                     stage: str = "overlap", **options: Any) -> list[OverlapTrial]:
    """Segment each ``(name, image, geometry)`` volume at every candidate overlap and score it.

    Args:
        model: a ``LoadedModel``.
        volumes: ``(name, (C, D, H, W) or (D, H, W) raw image, Geometry)``, as ``segment_volume`` takes them.
        references: per volume a ``(D, H, W)`` label map on the volume's own grid (class ids of the
            model's card).
        candidates: overlaps in ``[0, 1)``.
        device: as ``segment_volume``'s.
        reporter: a ``progress.Reporter``: one bar (``stage``).
        options: further ``segment_volume`` keywords (``backend``, ``precision``, ``window``, ``restore``,
            ``postprocess``); by default what ``recokd segment`` chooses.

    Returns:
        one :class:`OverlapTrial` per candidate, in the given order.
    """
    from ReCoKDLib.infer import segment_volume

    if len(volumes) != len(references) or not volumes:
        raise ValueError(f"{len(volumes)} calibration volume(s) and {len(references)} reference(s): "
                         "give one reference per volume, at least one")
    k = model.card.num_classes
    total = len(candidates) * len(volumes)
    if reporter is not None:
        reporter.start(stage, total=total, message=f"overlaps {', '.join(f'{o:g}' for o in candidates)} "
                       f"on {len(volumes)} volume(s)")
    trials, done = [], 0
    for overlap in candidates:
        per_volume, windows, seconds = {}, 0, 0.0
        for (name, image, geometry), reference in zip(volumes, references):
            result = segment_volume(model, image, geometry, overlap=float(overlap), device=device, **options)
            per_volume[name] = label_dice(result.labels, np.asarray(reference), k)
            windows += _windows(result.info, float(overlap))
            seconds += result.seconds
            done += 1
            if reporter is not None:
                reporter.progress(stage, done, total, message=f"overlap {overlap:g}, {name}: Dice {per_volume[name]:.4f}")
        trials.append(OverlapTrial(float(overlap), float(np.mean(list(per_volume.values()))), per_volume, windows,
                                   round(seconds, 3)))
    if reporter is not None:
        reporter.done(stage)
    return trials


def choose_overlap(trials: Sequence[OverlapTrial], tolerance: float = TOLERANCE) -> OverlapTrial:
    """The trial with the fewest windows among those within ``tolerance`` mean Dice of the best
    (ties: the higher Dice, then the larger overlap)."""
    if not trials:
        raise ValueError("no overlap was measured")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    best = max(t.dice for t in trials)
    eligible = [t for t in trials if t.dice >= best - tolerance]
    return min(eligible, key=lambda t: (t.windows, -t.dice, -t.overlap))


def write_overlap(model_path: str | os.PathLike, out_path: str | os.PathLike, trials: Sequence[OverlapTrial],
                  chosen: OverlapTrial, tolerance: float = TOLERANCE, reference: str = "") -> Path:
    """Write ``model_path``'s model to ``out_path`` with the chosen overlap in its card
    (``inference["overlap"]``) and the measurement in ``metrics["overlap_choice"]``; the weights
    are unchanged. ``reference``: what the Dice was measured against, in words. The record names
    the source file (``model_sha256``), so a caller can tell whether a written choice is still its own."""
    from dataclasses import replace

    from ReCoKDLib.checkpoint import load_model_file, save_model, sha256_file

    card, state = load_model_file(model_path)
    record = {"chosen": chosen.overlap, "tolerance": tolerance, "model_sha256": sha256_file(model_path), "rule": "fewest windows within tolerance of the best "
              "mean Dice (ties: higher Dice)", "reference": reference, "trials": [t.to_dict() for t in trials]}
    card = replace(card, inference={**dict(card.inference or {}), "overlap": chosen.overlap},
                   metrics={**dict(card.metrics or {}), "overlap_choice": record})
    return save_model(out_path, state, card)
