"""The ``recokd`` command: one thin argparse front over importable functions.

Every subcommand lives next to the code it drives, in a module that defines::

    def configure_parser(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...

This table only names them, so ``recokd --help`` starts without importing torch, and a
subcommand's module is imported only when it is used.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

#: subcommand -> (module that implements it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("ReCoKDLib.data.commands", "fetch and describe the real sample datasets"),
    "train-teacher": ("ReCoKDLib.commands.train_teacher", "train the built-in 3D U-Net teacher on a labelled dataset"),
    "distill": ("ReCoKDLib.commands.distill", "distill a compact student from a teacher (ReCo-KD or another method)"),
    "segment": ("ReCoKDLib.commands.segment", "segment a volume with a teacher or student (sliding window, exact geometry)"),
    "evaluate": ("ReCoKDLib.commands.evaluate", "per-class Dice/HD95, size and latency of models on a test set; report"),
    "inspect": ("ReCoKDLib.commands.inspect", "region masks and teacher/student affinity maps of an image as volumes, PNGs, HTML"),
    "export": ("ReCoKDLib.commands.export", "export a student as TorchScript and ONNX with its model card"),
    "tune-overlap": ("ReCoKDLib.commands.tune_overlap",
                     "choose a model's sliding-window overlap by measured agreement with a reference (writes a copy)"),
    "demo": ("ReCoKDLib.commands.demo", "the main job on real CT: teacher, plain student, distilled student, report"),
    "serve": ("ReCoKDLib.commands.serve", "the web app: load a volume, segment, inspect maps, download (127.0.0.1)"),
}


#: subcommands that load models named by the user (they take --trust-entry-point)
MODEL_COMMANDS = frozenset({"distill", "segment", "evaluate", "inspect", "export", "serve", "tune-overlap"})


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-entry-point SPEC`` (repeatable): code a model card or preset file may name (:mod:`ReCoKDLib.trust`)."""
    parser.add_argument(
        "--trust-entry-point", action="append", default=[], metavar="PKG.MODULE:CALLABLE",
        help="run this entry point when a model card or teacher-preset file names it (repeatable). Model files "
             "never choose code to run on their own: only ReCoKD's and MONAI's networks are allowed without it. "
             "Use it only for files from a source you trust")


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser; only the subcommand named in ``argv_command`` is configured."""
    from ReCoKDLib import __version__

    parser = argparse.ArgumentParser(
        prog="recokd",
        description="ReCoKD: distill large 3D segmentation networks into small, fast students.",
    )
    parser.add_argument("--version", action="version", version=f"recokd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == argv_command:
            importlib.import_module(module_name).configure_parser(sub)
            if name in MODEL_COMMANDS:
                add_trust_argument(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recokd`` console script. Returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    from ReCoKDLib.trust import trusted_entry_points

    with trusted_entry_points(getattr(args, "trust_entry_point", None)):
        return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
