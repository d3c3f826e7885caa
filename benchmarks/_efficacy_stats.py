"""The statistics of :mod:`efficacy` (pure functions of the run records): gap recovery, mean ± sd,
the paired difference to the plain student with its 95 % t-interval, the per-method summary and
the choice of a KD candidate on validation."""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

#: the teacher must beat the plain student by at least this much mean Dice for a gap recovery
MIN_GAP = 1e-3

GAP_RECOVERY_DEFINITION = (
    "gap recovery = (Dice_KD - Dice_student) / (Dice_teacher - Dice_student) on the mean Dice over foreground "
    "classes on the test case. per_seed: KD run of seed s vs the plain student of seed s, then mean and sd over "
    f"seeds; of_means: mean KD Dice vs mean plain-student Dice. null when Dice_teacher - Dice_student < {MIN_GAP} "
    "(no gap to recover)."
)




def gap_recovery(kd: float | None, student: float | None, teacher: float | None, min_gap: float = MIN_GAP) -> float | None:
    """``(kd - student) / (teacher - student)``; ``None`` when a value is missing or the gap < ``min_gap``."""
    if kd is None or student is None or teacher is None:
        return None
    gap = teacher - student
    if not gap >= min_gap:
        return None
    return (kd - student) / gap


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (``None`` for fewer than 2 values) and count of the defined values."""
    defined = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not defined:
        return None, None, 0
    sd = statistics.stdev(defined) if len(defined) > 1 else None
    return statistics.fmean(defined), sd, len(defined)


#: two-sided 95 % Student t quantiles by degrees of freedom (1..30)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_difference(kd: Mapping[int, float | None], plain: Mapping[int, float | None]) -> dict[str, Any]:
    """Mean and 95 % t-interval of ``kd[seed] - plain[seed]`` over the seeds both have.

    ``ci95`` is ``None`` with fewer than 2 pairs (no spread to estimate).
    """
    diffs = [float(kd[s]) - float(plain[s]) for s in sorted(set(kd) & set(plain))
             if kd[s] is not None and plain[s] is not None]
    mean, sd, n = mean_sd(diffs)
    ci = None
    if n >= 2 and sd is not None:
        half = _T975[min(n - 1, len(_T975)) - 1] * sd / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {"mean": mean, "sd": sd, "n": n, "ci95": ci, "per_seed": diffs}


def summarize(runs: Sequence[Mapping[str, Any]], teacher_dice: float | None, methods: Sequence[str],
              baselines: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Per method: mean ± sd of the test mean Dice and HD95 over seeds, training time and steps, gap
    recovery (per seed and of the means) and the paired difference to its plain student.

    ``runs`` are the records of one dataset (``method``, ``seed``, ``mean_dice``, ``mean_hd95``,
    ``train_seconds``). ``baselines`` names each method's plain student (default ``"none"``; a
    batch-norm KD student is compared with ``"none_bn"``); the plain student ``"none"`` itself has
    no gap recovery or paired difference.
    """
    def plain_of(name: str) -> dict[int, float | None]:
        return {r["seed"]: r["mean_dice"] for r in runs if r["method"] == name}

    out: dict[str, Any] = {}
    for method in methods:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        if not mine:
            continue
        baseline = (baselines or {}).get(method, "none")
        plain = plain_of(baseline)
        plain_mean, _, _ = mean_sd(list(plain.values()))
        dice_m, dice_sd, n = mean_sd([r["mean_dice"] for r in mine])
        hd_m, hd_sd, _ = mean_sd([r.get("mean_hd95") for r in mine])
        t_m, _, _ = mean_sd([r.get("train_seconds") for r in mine])
        steps_m, _, _ = mean_sd([r.get("steps") for r in mine])
        per_seed = [None if method == "none" else gap_recovery(r["mean_dice"], plain.get(r["seed"]), teacher_dice)
                    for r in mine]
        gr_m, gr_sd, gr_n = mean_sd(per_seed)
        out[method] = {
            "seeds": [r["seed"] for r in mine], "n": n, "baseline": None if method == "none" else baseline,
            "diverged_seeds": [r["seed"] for r in mine if r.get("status") == "diverged"],
            "mean_dice": dice_m, "sd_dice": dice_sd, "mean_hd95": hd_m, "sd_hd95": hd_sd,
            "mean_train_seconds": t_m, "mean_steps": steps_m,
            "delta_dice_vs_plain": None if dice_m is None or plain_mean is None else dice_m - plain_mean,
            "gap_recovery_per_seed": {"mean": gr_m, "sd": gr_sd, "n": gr_n, "values": per_seed},
            "gap_recovery_of_means": None if method == "none" else gap_recovery(dice_m, plain_mean, teacher_dice),
            "paired_diff_vs_plain": None if method == "none" else paired_difference(
                {r["seed"]: r["mean_dice"] for r in mine}, plain),
        }
    return out


def select_candidate(scores: Sequence[float | None]) -> int | None:
    """Index of the best validation Dice (the first on ties); ``None`` until every candidate has one."""
    if not scores or any(v is None for v in scores):
        return None
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
