"""``recokd demo``: README command 1. See :mod:`ReCoKDLib.demo_heads` (default) and :mod:`ReCoKDLib.demo` (``--task ct``)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ReCoKDLib.progress import add_progress_argument

TASKS = ("heads", "ct")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Default (--task heads): distil the pretrained HD-BET brain-extraction teacher (16 M parameters) into a "
        "student a tenth its size, without labels, on the real T1 heads (teacher outputs computed once per head), "
        "then score both on the held-out heads (Dice vs the teacher and vs Colin27's reference mask, parameters, "
        "CPU latency, speed-up). --task ct: train a small CT teacher and x4-thinner students with and without "
        "ReCo-KD on real CT. Both write OUT/metrics.json, a report and OUT/summary.txt; runs again resume or reuse "
        "finished stages."
    )
    parser.add_argument("--task", choices=TASKS, default="heads",
                        help="heads (default): HD-BET distilled label-free; ct: the CT teacher/students job")
    parser.add_argument("--out", default=None, help="output folder (default: runs/demo, or runs/demo-ct with --task ct)")
    parser.add_argument("--data", default=None, help="sample data folder (default: $RECOKD_DATA_DIR or ~/.cache/recokd)")
    parser.add_argument("--teacher", default=None,
                        help="--task heads: the teacher (default preset:hd-bet; any preset JSON with taps)")
    parser.add_argument("--trust-entry-point", action="append", default=[], metavar="MODULE:CALLABLE",
                        help="--task heads: an entry point the teacher preset may import (repeatable)")
    parser.add_argument("--student-norm", choices=("instance", "batch"), default=None,
                        help="the student's normalisation (--task heads: default instance, HD-BET's own: "
                             "recokd segment runs it in its 64^3 training patches; batch: fixed statistics, run in "
                             "one window on the whole head, faster but less close to the teacher. --task ct: default batch, "
                             "segmented in one window over the whole scan; instance: the teacher's)")
    parser.add_argument("--student-stem", choices=("full", "strided"), default=None,
                        help="--task ct: full (default: the teacher's stages) or strided (no full-resolution "
                             "stage, faster on a CPU)")
    parser.add_argument("--overlap", default=None, metavar="auto|FRACTION", type=_overlap,
                        help="--task heads: the sliding-window overlap written to the student's card (what recokd "
                             "segment uses): auto (default: the fewest windows within 0.005 mean Dice of the best "
                             "agreement with the teacher on the training heads, tried at 0.5, 0.25, 0.1, 0) or a "
                             "number in [0, 1)")
    parser.add_argument("--full", action="store_true", help="--task ct: the longer configuration (for a GPU)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="--task ct: override the teacher's step budget")
    parser.add_argument("--student-steps", type=int, default=None, help="override each student's step budget")
    parser.add_argument("--kd", default=None, help="KD method(s) of the distilled student, e.g. recokd or recokd:1,logit:0.5")
    parser.add_argument("--kd-weight", type=float, default=None, help="lambda of the KD term after warm-up (default 0.01)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the runs")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 on the CPU (slower)")
    parser.add_argument("--device", default=None, help="where students train: auto, cpu, cuda or cuda:N "
                        "(default cpu for heads, auto for ct); latency is measured on the CPU")
    add_progress_argument(parser)


def _overlap(text: str) -> str | float:
    """``--overlap``: ``auto`` or a number in ``[0, 1)``."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"the overlap must be in [0, 1), got {value}")
    return value


def heads_config(args: argparse.Namespace):
    """:class:`~ReCoKDLib.demo_heads.HeadsDemoConfig` from the command line (``--task heads``)."""
    from ReCoKDLib.demo_heads import HeadsDemoConfig
    from ReCoKDLib.losses.registry import parse_kd_spec

    if args.full or args.teacher_steps is not None or args.student_stem is not None:
        raise ValueError("--full, --teacher-steps and --student-stem apply to --task ct (the heads demo's teacher is "
                         "pretrained; its student's stem is the preset's)")
    config = HeadsDemoConfig(trust_entry_points=tuple(args.trust_entry_point))
    overrides = {"teacher": args.teacher, "steps": args.student_steps, "kd_weight": args.kd_weight, "seed": args.seed,
                 "kd": parse_kd_spec(args.kd) if args.kd else None, "student_norm": args.student_norm,
                 "inference_overlap": args.overlap}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    return replace(config, bf16=False) if args.no_bf16 else config


def ct_config(args: argparse.Namespace):
    """:class:`~ReCoKDLib.demo.DemoConfig` from the command line (``--task ct``)."""
    from ReCoKDLib.demo import FULL, DemoConfig

    if args.teacher or args.trust_entry_point or args.overlap is not None:
        raise ValueError("--teacher, --trust-entry-point and --overlap apply to --task heads "
                         "(--task ct trains its teacher)")
    config = FULL if args.full else DemoConfig()
    overrides = {
        "teacher_steps": args.teacher_steps, "student_steps": args.student_steps, "kd": args.kd,
        "kd_weight": args.kd_weight, "seed": args.seed, "student_norm": args.student_norm,
        "student_stem": args.student_stem,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    return replace(config, bf16=False) if args.no_bf16 else config


def run(args: argparse.Namespace) -> int:
    from ReCoKDLib.commands.runner import run_command

    out = Path(args.out or ("runs/demo" if args.task == "heads" else "runs/demo-ct"))

    def job(reporter) -> None:
        if args.task == "heads":
            from ReCoKDLib.demo_heads import run_heads_demo

            run_heads_demo(out, data_dir=args.data, config=heads_config(args), device=args.device or "cpu",
                           reporter=reporter)
        else:
            from ReCoKDLib.demo import run_ct_demo

            run_ct_demo(out, data_dir=args.data, config=ct_config(args), device=args.device or "auto", reporter=reporter)

    return run_command(args, "demo", job, lock=str(out),
                       resume_hint="run the same command again: finished stages are reused, training resumes",
                       memory_hint="the configuration (leave out --full), or close other programs")
