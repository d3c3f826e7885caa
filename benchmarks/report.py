"""Turn the benchmark JSON into plots, ``report.md`` and the README's headline table (issue 6, part 3).

Reads from ``--results-dir`` (default ``benchmarks/results/``): ``efficacy.json`` (and any
``efficacy_gpu_*.json`` and other ``efficacy_*.json`` runs, e.g. a longer student budget: each its
own section), ``performance.json``, and ``pretrained_teacher.json`` when present
(top-level ``date``, ``machine``, ``command``, ``teacher`` {name, params, latency_s}, ``students``
[{method, params, latency_s, dice_vs_teacher_mean, dice_vs_teacher_sd}]). Writes beside them:

* ``dice_per_method.png``: mean Dice ± sd over seeds per method, one panel per dataset, the
  teacher as a line;
* ``learning_curves.png``: validation mean Dice vs step of every run (teacher, every student and
  every KD candidate), one panel per dataset;
* ``latency_params_vs_width.png``: parameters and CPU latency (whole S1, fp32 and bf16) vs width;
* ``report.md``: every table.

``--readme README.md`` replaces the text between ``<!-- BEGIN BENCHMARK HEADLINE -->`` and
``<!-- END BENCHMARK HEADLINE -->`` with the headline table (teacher vs plain student vs ReCo-KD
student: Dice mean ± sd, parameters, latency) and the date, machine and command of each source.
Every number comes from the JSON; nothing is typed by hand, and a ReCo-KD student that does not
beat the plain student shows as such.

Usage::

    python benchmarks/report.py
    python benchmarks/report.py --readme README.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402
from _measure import BenchmarkError  # noqa: E402

BEGIN = "<!-- BEGIN BENCHMARK HEADLINE -->"
END = "<!-- END BENCHMARK HEADLINE -->"
HEADLINE_METHODS = (("teacher", "teacher"), ("none", "plain student (÷4)"), ("recokd", "ReCo-KD student (÷4)"))


# ---------------------------------------------------------------------------------------------
# Formatting (pure)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pm(mean: float | None, sd: float | None, digits: int = 3) -> str:
    """``mean ± sd`` (``mean`` alone without an sd, ``–`` without a mean)."""
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd is not None else f"{mean:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def source_line(data: Mapping[str, Any], what: str) -> str:
    machine = data.get("machine") or {}
    if isinstance(machine, Mapping):
        parts = [machine.get("cpu"), (f"{machine['threads']} thread" + ("s" if machine["threads"] != 1 else "")) if machine.get("threads") else None,
                 f"torch {machine['torch']}" if machine.get("torch") else None, machine.get("gpu")]
        machine = ", ".join(str(p) for p in parts if p)
    commit = f", commit {data['git_commit'][:12]}" if data.get("git_commit") else ""
    return f"{what}: {data.get('date', '?')} on {machine or '?'}{commit}; `{data.get('command', '?')}`"


def efficacy_sources(efficacy: Mapping[str, Any], what: str) -> list[str]:
    """One source line per dataset run where datasets came from separate runs (each block's
    ``provenance``: date, machine, commit, command), else the file's own; then its ``note``."""
    runs = [(block.get("dataset", key), block["provenance"]) for key, block in efficacy.get("datasets", {}).items()
            if isinstance(block.get("provenance"), Mapping)]
    lines = [source_line(p, f"{what} ({name})") for name, p in runs] or [source_line(efficacy, what)]
    if efficacy.get("note"):
        lines.append(f"Note: {efficacy['note']}")
    return lines


# ---------------------------------------------------------------------------------------------
# Tables


def _reference_dice(entry: Mapping[str, Any]) -> str:
    refs = entry.get("dice_vs_reference") or {}
    return ", ".join(f"{fmt(v, 3)} ({k})" for k, v in refs.items()) or "–"


def pretrained_table(pretrained: Mapping[str, Any]) -> str:
    """The label-free distillation of a pretrained third-party teacher: one row per model."""
    t = pretrained.get("teacher", {})
    t_latency = t.get("latency_s")
    rows = [[f"teacher {t.get('name', '?')}", "1 (itself)", _reference_dice(t), fmt(t.get("params")),
             fmt(t_latency, 2), "1.0×"]]
    for s in pretrained.get("students", []):
        speedup = f"{t_latency / s['latency_s']:.1f}×" if t_latency and s.get("latency_s") else "–"
        rows.append([f"student ({s.get('method')})", pm(s.get("dice_vs_teacher_mean"), s.get("dice_vs_teacher_sd")),
                     _reference_dice(s), fmt(s.get("params")), fmt(s.get("latency_s"), 2), speedup])
    return "\n\n".join([
        f"Pretrained teacher, no labels (held-out real T1 heads; students distilled from the teacher's outputs only):",
        table(["model", "Dice vs teacher (mean ± sd over heads)", "Dice vs reference mask", "parameters",
               "CPU latency, whole head (s)", "speed-up"], rows),
        "- " + source_line(pretrained, "pretrained teacher") + ". The three students have the same "
        "architecture: their latency differences are measurement noise (the runs shared the machine)."])


def diff_ci(s: Mapping[str, Any] | None) -> str:
    """The paired difference to the plain student: ``+0.031 [−0.010, 0.072]`` (95 % t-interval)."""
    d = (s or {}).get("paired_diff_vs_plain") or {}
    if d.get("mean") is None:
        return "–"
    ci = d.get("ci95")
    return f"{d['mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def headline(efficacy: Mapping[str, Any] | None, performance: Mapping[str, Any] | None,
             pretrained: Mapping[str, Any] | None = None) -> str:
    """The README block: per dataset, teacher vs plain vs ReCo-KD student, with sources."""
    parts: list[str] = []
    if efficacy:
        rows = []
        for key, block in efficacy.get("datasets", {}).items():
            teacher = block.get("teacher") or {}
            summary = block.get("summary", {})
            params_student = next((r.get("params") for r in block.get("runs", []) if r.get("params")), None)
            for method, label in HEADLINE_METHODS:
                if method == "teacher":
                    dice, params, extra = pm(teacher.get("mean_dice"), None), teacher.get("params"), "–"
                else:
                    s = summary.get(method)
                    if s is None:
                        continue
                    dice, params = pm(s["mean_dice"], s["sd_dice"]), params_student
                    extra = "–" if method == "none" else fmt(s["gap_recovery_per_seed"]["mean"], 2)
                n = "1" if method == "teacher" else str(summary.get(method, {}).get("n", "–"))
                rows.append([f"{block.get('dataset', key)}", label, dice, n, fmt(params), extra,
                             "–" if method in ("teacher", "none") else diff_ci(summary.get(method))])
        parts.append(table(["dataset", "model", "mean Dice (test case)", "seeds", "parameters",
                            "gap recovery", "Δ Dice vs plain, paired [95 % CI]"], rows))
        parts.append("Dice: mean ± sd over seeds on the held-out test case; teachers trained until their "
                     "validation Dice stopped improving, students with one step budget for all (the best-validation "
                     "checkpoint is evaluated; how the runs ended is in the report); gap recovery: (Dice_KD − "
                     "Dice_plain) / (Dice_teacher − Dice_plain), per seed, mean; Δ: paired by seed, with a 95 % "
                     "t-interval.")
        parts += ["- " + line for line in efficacy_sources(efficacy, "efficacy")]
    if performance:
        parts.append("- " + source_line(performance, "performance"))
    if pretrained:
        parts.append(pretrained_table(pretrained))
    if not parts:
        return "(no benchmark results yet: run benchmarks/efficacy.py and benchmarks/performance.py)"
    return "\n\n".join(parts)


def _training_extent(runs: Sequence[Mapping[str, Any]], cap: Any) -> str:
    """How the student runs ended: stopped at their validation plateau, or at the step cap."""
    runs = [r for r in runs if r.get("steps") is not None]
    if not runs:
        return ""
    early = sum(bool(r.get("stopped_early")) for r in runs)
    best = sorted(int(r["best_step"]) for r in runs if r.get("best_step") is not None)
    at_cap = len(runs) - early
    text = (f"{early} of {len(runs)} student runs stopped at their validation plateau; {at_cap} ran the whole "
            f"budget of {fmt(cap)} steps (poly learning-rate decay to 0)")
    if best:
        text += f", best validation at steps {fmt(best[0])}–{fmt(best[-1])}"
    rises = []  # best validation Dice in the last quarter of the budget minus the best before it
    for r in runs:
        curve, steps = r.get("curve") or [], r.get("steps")
        if not curve or not steps:
            continue
        before = [v for s, v in curve if s <= 0.75 * float(steps)]
        after = [v for s, v in curve if s > 0.75 * float(steps)]
        if before and after:
            rises.append(max(after) - max(before))
    if rises:
        rises.sort()
        text += (f"; in the last quarter of each run the best validation Dice still rose by {rises[len(rises) // 2]:+.3f} "
                 f"(median; {rises[0]:+.3f} to {rises[-1]:+.3f})")
    if at_cap and best and cap and best[len(best) // 2] >= 0.8 * float(cap):
        text += (". **Budget**: most runs were still improving near the cap (with the learning rate annealed), "
                 "so they are not converged and a longer budget may move every method; not tested here")
    return text + "."


def _edge_choices(selection: Mapping[str, Any]) -> list[str]:
    """KD methods whose chosen loss weight is the largest or smallest candidate tried."""
    notes = []
    for method, sel in selection.items():
        weights = [c.get("hyperparameters", {}).get("kd_weight") for c in sel.get("candidates", [])]
        chosen = sel.get("chosen")
        if chosen is None or len(set(weights)) < 2 or None in weights:
            continue
        w = weights[chosen]
        same = [i for i, x in enumerate(weights) if x == w]
        if len(same) > 1:  # the weight is shared (another option varies): no edge in lambda alone
            continue
        if w == max(weights):
            notes.append(f"{method} (lambda={fmt(w)}, the largest tried)")
        elif w == min(weights):
            notes.append(f"{method} (lambda={fmt(w)}, the smallest tried)")
    return notes


def limits_section(block: Mapping[str, Any], student_cap: Any = None) -> str:
    """What limits the result on one dataset, read off its JSON: data (the teacher's validation vs
    test Dice), room (the teacher's lead over the plain student, and where it lies), budget (how
    the student runs ended) and loss weight (choices at the edge of the candidate grid)."""
    teacher = block.get("teacher") or {}
    summary = block.get("summary") or {}
    runs = block.get("runs") or []
    lines = []
    t_test, t_val = teacher.get("mean_dice"), teacher.get("best_val_dice")
    if t_test is not None and t_val is not None:
        lines.append(f"**Data**: the teacher scores {fmt(t_val)} on the held-out slices of its training volume "
                     f"and {fmt(t_test)} on the test scan ({', '.join(block.get('test_cases', []))}); "
                     + ("one training volume. " if len(block.get("train_cases", [])) == 1 else
                        f"{len(block.get('train_cases', []))} training volumes. ")
                     + ("Most of what it misses on the test scan is generalisation across scans, which "
                        "distillation from it cannot add." if t_val - t_test > 0.15 else
                        "It generalises to the test scan about as well as to its own held-out slices."))
    plain = summary.get("none")
    if plain and t_test is not None:
        gap = t_test - plain["mean_dice"]
        classes = block.get("classes", [])
        plain_runs = [r for r in runs if r.get("method") == "none"]
        per_class = []
        for c in classes:
            t = (teacher.get("dice") or {}).get(c)
            vals = [r["dice"][c] for r in plain_runs if (r.get("dice") or {}).get(c) is not None]
            if t is not None and vals:
                per_class.append((t - sum(vals) / len(vals), c))
        big = [f"{c} ({d:+.2f})" for d, c in sorted(per_class, reverse=True) if d >= 0.1]
        text = (f"**Room**: the teacher leads the plain student by {gap:+.3f} mean Dice "
                f"(plain student sd over seeds {fmt(plain.get('sd_dice'))})")
        if plain.get("sd_dice") is not None and gap < 2 * plain["sd_dice"]:
            text += ": less than twice the spread over seeds, so gap recovery is mostly noise here"
        if per_class:
            text += (f"; {len(big)} of {len(per_class)} classes carry a lead of 0.1 or more"
                     + (f": {', '.join(big)}" if big else ""))
        lines.append(text + ".")
    extent = _training_extent([r for r in runs if r.get("method") is not None], student_cap)
    if extent:
        lines.append(f"**Steps**: {extent}")
    edges = _edge_choices(block.get("selection") or {})
    if edges:
        lines.append("**Loss weight**: chosen at the edge of the candidate grid for " + "; ".join(edges)
                     + ": a weight beyond it was not tried.")
    if not lines:
        return ""
    return "\n".join(["What limits the result (read off this JSON):", ""] + [f"- {line}" for line in lines])


def efficacy_section(efficacy: Mapping[str, Any]) -> str:
    out = [f"## Efficacy ({efficacy.get('config', {}).get('budget', {}).get('name', '?')} configuration)",
           *(x for line in efficacy_sources(efficacy, "Produced") for x in (line, "")),
           efficacy.get("gap_recovery_definition", "")]
    for key, block in efficacy.get("datasets", {}).items():
        teacher = block.get("teacher") or {}
        split = (block.get("validation_split") or {}).get("method")
        out += ["", f"### {block.get('dataset', key)}: train {', '.join(block.get('train_cases', []))}, "
                    f"test {', '.join(block.get('test_cases', []))}",
                f"Teacher: mean Dice {fmt(teacher.get('mean_dice'))}, mean HD95 {fmt(teacher.get('mean_hd95'), 1)} mm, "
                f"{fmt(teacher.get('params'))} parameters; best validation Dice {fmt(teacher.get('best_val_dice'))} at "
                f"step {fmt(teacher.get('best_step'))} of {fmt(teacher.get('steps'))} "
                f"({'stopped at the plateau' if teacher.get('stopped_early') else 'step cap reached'})."]
        if split:
            out.append(f"Validation split: {split}.")
        out.append("")
        rows = []
        for method, s in block.get("summary", {}).items():
            gr = s["gap_recovery_per_seed"]
            diverged = s.get("diverged_seeds") or []
            seeds = f"{s['n']} (+{len(diverged)} diverged)" if diverged else s["n"]
            versus = f" (vs {s['baseline']})" if s.get("baseline") not in (None, "none") else ""
            rows.append([method, seeds, pm(s["mean_dice"], s["sd_dice"]), diff_ci(s) + versus if method != "none" else "–",
                         pm(gr["mean"], gr["sd"], 2), fmt(s["gap_recovery_of_means"], 2), pm(s["mean_hd95"], s["sd_hd95"], 1),
                         fmt(s.get("mean_steps"), 0), fmt(s["mean_train_seconds"], 0)])
        out.append(table(["method", "seeds", "mean Dice", "Δ vs plain, paired [95 % CI]", "gap recovery (per seed)",
                          "gap recovery (of means)", "mean HD95 (mm)", "steps", "train (s)"], rows))
        selection = block.get("selection") or {}
        if selection:
            out += ["", "KD hyper-parameters chosen on the validation split (seed 0, best validation Dice):", ""]
            rows = [[method, c["label"], fmt(c.get("val_dice")), fmt(c.get("test_mean_dice")),
                     "**chosen**" if i == sel.get("chosen") else ""]
                    for method, sel in selection.items() for i, c in enumerate(sel.get("candidates", []))]
            out.append(table(["method", "candidate", "validation Dice", "test Dice", ""], rows))
            for method, sel in selection.items():
                if sel.get("reused_from"):
                    now = sel.get("chosen_run_now") or {}
                    out += ["", f"{method}: the choice and these candidate scores are those of the run of "
                                f"{sel['reused_from'].get('date')} (commit {str(sel['reused_from'].get('git_commit'))[:12]}; "
                                f"`--reuse-selection`); the chosen candidate was trained again here: validation Dice "
                                f"{fmt(now.get('val_dice'))}, test {fmt(now.get('test_mean_dice'))}."]
        classes = block.get("classes", [])
        if classes and block.get("summary"):
            out += ["", "Per-class Dice (mean over seeds):", ""]
            rows = [["teacher", *(fmt((teacher.get("dice") or {}).get(c)) for c in classes)]]
            for method in block["summary"]:
                runs = [r for r in block.get("runs", []) if r["method"] == method]
                means = []
                for c in classes:
                    vals = [r["dice"].get(c) for r in runs if r.get("dice", {}).get(c) is not None]
                    means.append(fmt(sum(vals) / len(vals)) if vals else "–")
                rows.append([method, *means])
            out.append(table(["model", *classes], rows))
        limits = limits_section(block, (efficacy.get("config", {}).get("budget") or {}).get("student_steps"))
        if limits:
            out += ["", limits]
    return "\n".join(out)


def performance_section(perf: Mapping[str, Any]) -> str:
    out = ["## Performance", source_line(perf, "Produced"), "", "### Teacher vs students (whole S1 scan, sliding window)", ""]
    rows = []
    for name, m in perf.get("models", {}).items():
        v = m.get("vs_teacher", {})
        rows.append([name, "-".join(str(f) for f in m.get("filters", [])), fmt(m["params"]), fmt(v.get("params"), 3),
                     fmt(m["flops_per_window"] / 1e9, 2), fmt((m.get("cpu_fp32") or {}).get("seconds"), 2),
                     fmt(v.get("cpu_fp32_latency"), 2), fmt((m.get("cpu_bf16") or {}).get("seconds"), 2),
                     fmt(v.get("cpu_bf16_latency"), 2),
                     fmt(((m.get("cpu_fp32") or {}).get("peak_extra_bytes") or 0) / 2**20, 0),
                     fmt((m.get("gpu") or {}).get("seconds"), 3)])
    out.append(table(["model", "widths", "params", "× teacher", "GFLOPs/window", "CPU fp32 (s)", "× teacher",
                      "CPU bf16 (s)", "× teacher", "peak fp32 (MiB)", "GPU (s)"], rows))
    for patch, variants in perf.get("steps", {}).items():
        out += ["", f"### One distillation step, patch {patch}", ""]
        rows = []
        for variant, r in variants.items():
            beyond = r.get("beyond_teacher_forward") or {}
            rows.append([variant, fmt(r["seconds"]), fmt(r["vs_student"]["time"], 2),
                         fmt((r.get("peak_extra_bytes") or 0) / 2**20, 0), fmt(r["vs_student"]["peak"], 2),
                         fmt(beyond.get("seconds")), fmt((beyond.get("peak_bytes") or 0) / 2**20, 0) if beyond else "–"])
        out.append(table(["step", "time (s)", "× student", "peak (MiB)", "× student", "beyond teacher forward (s)",
                          "beyond teacher forward (MiB)"], rows))
    onnx = perf.get("onnx")
    if onnx:
        out += ["", "### ÷4 student: PyTorch fp32 vs ONNX Runtime (CPU)", "",
                table(["runtime", "one window (s)", "whole S1 (s)"],
                      [[k, fmt(onnx[k]["window_seconds"]), fmt(onnx[k]["volume_seconds"], 2)] for k in ("torch", "onnxruntime")]),
                "", f"Speed-up: ×{fmt(onnx['speedup_window'], 2)} per window, ×{fmt(onnx['speedup_volume'], 2)} on the "
                    f"volume; largest logit difference {onnx['volume_max_abs_diff']:.2e}."]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Plots


def plot_dice(efficacy: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = efficacy.get("datasets", {})
    fig, axes = plt.subplots(1, max(1, len(blocks)), figsize=(6 * max(1, len(blocks)), 4), squeeze=False)
    for ax, (key, block) in zip(axes[0], blocks.items()):
        summary = block.get("summary", {})
        names = list(summary)
        means = [summary[m]["mean_dice"] or 0.0 for m in names]
        sds = [summary[m]["sd_dice"] or 0.0 for m in names]
        colors = ["tab:gray" if m == "none" else "tab:red" if m == "recokd" else "tab:blue" for m in names]
        ax.bar(range(len(names)), means, yerr=sds, capsize=3, color=colors)
        teacher = (block.get("teacher") or {}).get("mean_dice")
        if teacher is not None:
            ax.axhline(teacher, color="black", linestyle="--", label=f"teacher {teacher:.3f}")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_ylabel("mean Dice (test case)")
        ax.set_title(block.get("dataset", key))
    fig.tight_layout()
    return _save(fig, path)


def plot_curves(efficacy: Mapping[str, Any], path: Path) -> Path:
    """Validation mean Dice vs step of every run, one panel per dataset (teacher in black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = efficacy.get("datasets", {})
    fig, axes = plt.subplots(1, max(1, len(blocks)), figsize=(7 * max(1, len(blocks)), 4.5), squeeze=False)
    for ax, (key, block) in zip(axes[0], blocks.items()):
        methods = list(block.get("summary", {}))
        colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
        teacher = block.get("teacher") or {}
        if teacher.get("curve"):
            ax.plot(*zip(*teacher["curve"]), color="black", lw=2, label="teacher")
        seen = set()
        for run in block.get("runs", []):
            if run.get("curve"):
                label = run["method"] if run["method"] not in seen else None
                seen.add(run["method"])
                ax.plot(*zip(*run["curve"]), color=colors.get(run["method"], "gray"), lw=1, label=label)
        for method, sel in (block.get("selection") or {}).items():
            for i, cand in enumerate(sel.get("candidates", [])):
                if cand.get("curve") and i != sel.get("chosen"):
                    ax.plot(*zip(*cand["curve"]), color=colors.get(method, "gray"), lw=0.7, ls=":")
        ax.set_xlabel("step")
        ax.set_ylabel("validation mean Dice")
        ax.set_title(f"{block.get('dataset', key)} (dotted: KD candidates not chosen)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_width(performance: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted(performance.get("models", {}).values(), key=lambda m: m["reduction"])
    widths = [1 / m["reduction"] for m in models]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(widths, [m["params"] / 1e6 for m in models], "o-")
    a.set_xlabel("width (× teacher)")
    a.set_ylabel("parameters (M)")
    for key, label in (("cpu_fp32", "CPU fp32"), ("cpu_bf16", "CPU bf16"), ("gpu", "GPU")):
        pts = [(w, m[key]["seconds"]) for w, m in zip(widths, models) if m.get(key)]
        if pts:
            b.plot(*zip(*pts), "o-", label=label)
    b.set_xlabel("width (× teacher)")
    b.set_ylabel("whole-S1 latency (s)")
    b.legend()
    for ax in (a, b):
        ax.set_xscale("log", base=2)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    from ReCoKDLib.checkpoint import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# README


def replace_headline(text: str, block: str) -> str:
    """``text`` with everything between the two markers replaced by ``block`` (markers kept)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise BenchmarkError(f"the README needs the markers {BEGIN} and {END} (in that order) around the "
                             "benchmark headline; add them where the table should go")
    return text[: start + len(BEGIN)] + "\n" + block.strip() + "\n" + text[end:]


def load_results(results_dir: Path) -> dict[str, Any]:
    def maybe(name: str):
        path = results_dir / name
        return _measure.read_json(path) if path.is_file() else None

    return {"efficacy": maybe("efficacy.json"), "performance": maybe("performance.json"),
            "pretrained": maybe("pretrained_teacher.json"),
            "efficacy_other": {p.name: _measure.read_json(p) for p in sorted(results_dir.glob("efficacy_*.json"))}}


def build_report(results_dir: Path, readme: Path | None = None) -> dict[str, Path]:
    """Write plots and ``report.md`` into ``results_dir`` (and the README block); returns the paths written."""
    from ReCoKDLib.checkpoint import atomic_write_text

    res = load_results(results_dir)
    if res["efficacy"] is None and res["performance"] is None and not res["efficacy_other"]:
        raise BenchmarkError(f"no efficacy.json or performance.json in {results_dir}; run the benchmarks first")
    written: dict[str, Path] = {}
    sections = ["# ReCoKD benchmark report", "",
                "Generated by `benchmarks/report.py` from the JSON in this folder; nothing is typed by hand.", "",
                "## Headline", "", headline(res["efficacy"], res["performance"], res["pretrained"])]
    if res["efficacy"]:
        written["dice_plot"] = plot_dice(res["efficacy"], results_dir / "dice_per_method.png")
        written["curves"] = plot_curves(res["efficacy"], results_dir / "learning_curves.png")
        sections += ["", efficacy_section(res["efficacy"]), "", "![Dice per method](dice_per_method.png)", "",
                     "![Learning curves](learning_curves.png)"]
    for name, data in res["efficacy_other"].items():
        stem = Path(name).stem
        written[stem] = plot_dice(data, results_dir / f"dice_per_method_{stem}.png")
        sections += ["", efficacy_section(data).replace("## Efficacy", f"## Efficacy, `{name}`", 1), "",
                     f"![Dice per method, {stem}](dice_per_method_{stem}.png)"]
    if res["performance"]:
        written["width_plot"] = plot_width(res["performance"], results_dir / "latency_params_vs_width.png")
        sections += ["", performance_section(res["performance"]), "",
                     "![Latency and parameters vs width](latency_params_vs_width.png)"]
    written["report"] = atomic_write_text(results_dir / "report.md", "\n".join(sections) + "\n")
    if readme is not None:
        try:
            text = readme.read_text()
        except OSError as exc:
            raise BenchmarkError(f"cannot read {readme}: {exc}") from None
        block = headline(res["efficacy"], res["performance"], res["pretrained"])
        written["readme"] = atomic_write_text(readme, replace_headline(text, block))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=_measure.RESULTS_DIR)
    parser.add_argument("--readme", type=Path, help="README to update between the benchmark headline markers")
    args = parser.parse_args(argv)
    try:
        written = build_report(args.results_dir, args.readme)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
