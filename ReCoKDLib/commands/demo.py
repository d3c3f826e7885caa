"""``recokd demo``: the main job on real CT (README command 1). See :mod:`ReCoKDLib.demo`."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ReCoKDLib.progress import add_progress_argument


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Fetch the real CT organ sample data, train a small teacher (or reuse it), train a x4-thinner "
        "student with and without ReCo-KD, evaluate all three on the held-out scan, and write "
        "OUT/metrics.json, OUT/report.html and OUT/summary.txt. Runs again resume or reuse finished stages."
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--data", default=None, help="sample data folder (default: $RECOKD_DATA_DIR or ~/.cache/recokd)")
    parser.add_argument("--full", action="store_true", help="the longer configuration (more steps, larger patches; for a GPU)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="override the teacher's step budget")
    parser.add_argument("--student-steps", type=int, default=None, help="override each student's step budget")
    parser.add_argument("--kd", default=None, help="KD method(s) of the distilled student, e.g. recokd or recokd:1,logit:0.5")
    parser.add_argument("--kd-weight", type=float, default=None, help="lambda of the KD term after warm-up (default 0.01)")
    parser.add_argument("--seed", type=int, default=None, help="seed of all three runs (default 42)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 on the CPU (slower)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ReCoKDLib.demo import FULL, DemoConfig, run_demo

    config = FULL if args.full else DemoConfig()
    overrides = {
        "teacher_steps": args.teacher_steps, "student_steps": args.student_steps, "kd": args.kd,
        "kd_weight": args.kd_weight, "seed": args.seed,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_bf16:
        config = replace(config, bf16=False)
    from ReCoKDLib.commands.runner import run_command

    def job(reporter) -> None:
        run_demo(Path(args.out), data_dir=args.data, config=config, device=args.device, reporter=reporter)

    return run_command(args, "demo", job, lock=args.out,
                       resume_hint="run the same command again: finished stages are reused, training resumes",
                       memory_hint="the configuration (leave out --full), or close other programs")
