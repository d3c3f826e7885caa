"""``recokd export MODEL --out DIR``: TorchScript and ONNX of a model, with its model card;
``recokd export --nnunet ROOT --model STUDENT.pt``: a student of an nnU-Net teacher as an nnU-Net v2 model folder.

Examples::

    recokd export runs/student/model_best.pt --out exported --teacher runs/teacher/model_best.pt
    recokd export --nnunet exported_nnunet --model runs/student/model_best.pt

The first writes ``DIR/<name>.ts`` (TorchScript), ``DIR/<name>.onnx`` (dynamic batch and spatial axes,
checked against torch with ONNX Runtime) and ``DIR/<name>.json`` (classes, spacing, normalisation,
metrics, KD configuration, SHA-256 of student and teacher weights, library versions).
The second writes ``ROOT/DatasetNNN_Name/nnUNetTrainer__<Plans>__<config>_recokd/`` (``plans.json`` with
the student's configuration, ``dataset.json``, ``fold_0/checkpoint_final.pth``): run it with
``nnUNetv2_predict`` (``nnUNet_results=ROOT``) or SlicerNNUnet (point it at ROOT); see
:mod:`ReCoKDLib.nnunet.export`.
Exit codes (:mod:`ReCoKDLib.commands.runner`): 0 done, 1 failure while running, 2 bad input, 130/143
interrupted.
"""

from __future__ import annotations

import argparse

from ReCoKDLib.commands.runner import run_command
from ReCoKDLib.progress import add_progress_argument

STAGE = "export"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="ReCoKD model file (.pt) to export, normally a distilled student")
    parser.add_argument("--model", dest="model_option", metavar="MODEL", help="the model file (same as MODEL)")
    parser.add_argument("--out", help="output folder of the TorchScript/ONNX export")
    parser.add_argument("--format", nargs="+", choices=("torchscript", "onnx"), default=["torchscript", "onnx"],
                        dest="formats", help="formats to write (default: torchscript onnx)")
    parser.add_argument("--teacher", metavar="PATH",
                        help="teacher weights whose SHA-256 goes into the card (default: the one the card records)")
    n = parser.add_argument_group("nnU-Net export (students of nnU-Net teachers)")
    n.add_argument("--nnunet", metavar="ROOT",
                   help="write an nnU-Net v2 model folder under ROOT (an empty folder or a new one: one model per ROOT)")
    n.add_argument("--configuration", metavar="NAME",
                   help="name of the student's configuration in plans.json (default: <teacher configuration>_recokd)")
    n.add_argument("--overwrite", action="store_true", help="replace an earlier export of the same configuration")
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    model = args.model or args.model_option

    def job(reporter) -> None:
        if not model or (args.model and args.model_option and args.model != args.model_option):
            raise ValueError("give the model file once, as MODEL or --model MODEL")
        if not args.nnunet and not args.out:
            raise ValueError("give --out DIR (TorchScript/ONNX) or --nnunet ROOT (nnU-Net model folder)")
        from ReCoKDLib.outputs import check_destination

        for what, folder in (("--nnunet", args.nnunet), ("--out", args.out)):
            if folder:
                check_destination(folder, what, folder=True)
        if args.nnunet:
            from ReCoKDLib.nnunet.export import export_student

            folder = export_student(model, args.nnunet, configuration_name=args.configuration,
                                    overwrite=args.overwrite, reporter=reporter)
            if args.progress != "json":
                print(f"nnunet: {folder}")
        if args.out:
            from ReCoKDLib.export import export_model

            files = export_model(model, args.out, args.formats, teacher_path=args.teacher, reporter=reporter)
            if args.progress != "json":
                for fmt, path in files.items():
                    print(f"{fmt}: {path}")

    return run_command(args, STAGE, job)
