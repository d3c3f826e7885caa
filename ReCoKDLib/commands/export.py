"""``recokd export MODEL --out DIR``: TorchScript and ONNX of a model, with its model card.

Example::

    recokd export runs/student/model_best.pt --out exported --teacher runs/teacher/model_best.pt

Writes ``DIR/<name>.ts`` (TorchScript), ``DIR/<name>.onnx`` (dynamic batch and spatial axes,
checked against torch with ONNX Runtime) and ``DIR/<name>.json`` (classes, spacing, normalisation,
metrics, KD configuration, SHA-256 of student and teacher weights, library versions).
Exit codes: 0 done, 1 run error, 2 bad input.
"""

from __future__ import annotations

import argparse

from ReCoKDLib.commands.segment import run_command
from ReCoKDLib.progress import add_progress_argument

STAGE = "export"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ReCoKD model file (.pt) to export, normally a distilled student")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", nargs="+", choices=("torchscript", "onnx"), default=["torchscript", "onnx"],
                        dest="formats", help="formats to write (default: torchscript onnx)")
    parser.add_argument("--teacher", metavar="PATH",
                        help="teacher weights whose SHA-256 goes into the card (default: the one the card records)")
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    def job(reporter) -> None:
        from ReCoKDLib.export import export_model

        files = export_model(args.model, args.out, args.formats, teacher_path=args.teacher, reporter=reporter)
        if args.progress != "json":
            for fmt, path in files.items():
                print(f"{fmt}: {path}")

    return run_command(args, STAGE, job)
