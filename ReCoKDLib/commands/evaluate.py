"""``recokd evaluate``: per-class Dice and HD95, size, FLOPs and CPU latency of models on a test set.

Example::

    recokd evaluate --model teacher=runs/teacher/model_best.pt --model student=runs/plain/model_best.pt \\
        --model distilled=runs/kd/model_best.pt --dataset Dataset901_CTAbdomenOrgans --out report/

Test cases are the dataset's ``imagesTs`` with labels in ``labelsTs`` (nnU-Net raw layout), or
``--pairs IMAGE:LABEL``. Writes ``OUT/metrics.json`` (one entry per model) and ``OUT/report.html``
(self-contained) and prints a table. Classes are matched with the reference labels by name (the
dataset's ``dataset.json``, ``--reference-labels``, or a ``.seg.nrrd``'s segment names); a model class
the reference does not name is refused. Exit codes (:mod:`ReCoKDLib.commands.runner`): 0 done,
1 failure while running, 2 bad input, 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ReCoKDLib.commands.runner import run_command
from ReCoKDLib.commands.inference_options import add_inference_arguments, inference_kwargs
from ReCoKDLib.progress import add_progress_argument

STAGE = "evaluate"


def _name_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", action="append", type=_name_path, required=True, metavar="NAME=PATH",
                        help="a model to evaluate (repeatable): a ReCoKD model file or a TorchScript file with its card")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", metavar="DIR", help="dataset in nnU-Net raw layout; its labelled test cases are used")
    data.add_argument("--pairs", nargs="+", metavar="IMAGE:LABEL", help="test cases as image:label file pairs")
    parser.add_argument("--reference-labels", metavar="JSON",
                        help="names of the reference label values, to match them with the model's classes by name: a "
                             "JSON object {\"liver\": 1, ...}, a list of names (index = value), or a file holding "
                             "either, e.g. a dataset.json (default: the dataset's dataset.json; .seg.nrrd references "
                             "carry their own)")
    parser.add_argument("--out", required=True, help="output folder for metrics.json and report.html")
    parser.add_argument("--device", default="auto", help="device of the evaluation runs (latency is always CPU) (default auto)")
    parser.add_argument("--overlap", type=float, default=None,
                        help="sliding-window overlap (default: each model card's inference.overlap, else 0.5)")
    parser.add_argument("--mirror", action="store_true", help="test-time mirroring")
    parser.add_argument("--latency-repeats", type=int, default=3,
                        help="whole-volume CPU runs for the latency median (default 3; 0 skips)")
    parser.add_argument("--log", action="append", type=_name_path, default=[], metavar="NAME=PATH",
                        help="training log (JSON lines of progress events or JSON history) of model NAME, for the loss curves")
    add_inference_arguments(parser)
    add_progress_argument(parser)


def _cases(args: argparse.Namespace) -> tuple[list, dict | None]:
    """The test cases and the reference label table (the dataset's ``labels``, or ``--reference-labels``)."""
    from ReCoKDLib.data.layout import Case, RawDataset
    from ReCoKDLib.evaluate import read_label_table

    table = read_label_table(args.reference_labels) if args.reference_labels else None
    if args.dataset:
        dataset = RawDataset.open(args.dataset)
        cases = [c for c in dataset.test_cases() if c.label_path is not None]
        if not cases:
            raise ValueError(f"{args.dataset} has no labelled test case (imagesTs with labelsTs); use --pairs")
        return cases, table or dict(dataset.labels)
    cases = []
    for n, pair in enumerate(args.pairs):
        image, sep, label = pair.rpartition(":")
        if not sep or not image or not label:
            raise ValueError(f"--pairs expects IMAGE:LABEL; got {pair!r}")
        for path in (image, label):
            if not Path(path).exists():
                raise ValueError(f"--pairs {pair!r}: {path} does not exist")
        cases.append(Case(f"case_{n:03d}", [Path(image)], Path(label)))
    return cases, table


def format_table(metrics: dict) -> str:
    """A plain-text table: mean Dice, per-class Dice, parameters, latency."""
    if not metrics:
        return ""
    classes = list(next(iter(metrics.values()))["dice"])
    width = max(8, *(len(c) for c in classes))
    head = f"{'model':<12}{'mean':>8}" + "".join(f"{c[:width]:>{width + 1}}" for c in classes) + f"{'params':>10}{'latency':>10}"
    lines = [head]
    for name, m in metrics.items():
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lat = "-" if m.get("latency_s") is None else f"{m['latency_s']:.2f}s"
        lines.append(f"{name[:12]:<12}{fmt(m['mean_dice']):>8}" + "".join(f"{fmt(m['dice'][c]):>{width + 1}}" for c in classes)
                     + f"{m['params'] / 1e6:>9.2f}M{lat:>10}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    def job(reporter) -> None:
        from ReCoKDLib.evaluate import evaluate_models

        names = [n for n, _ in args.model]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique; got {names}")
        if args.latency_repeats < 0:
            raise ValueError(f"--latency-repeats must be >= 0; got {args.latency_repeats}")
        for name, path in args.model:
            if not Path(path).is_file():
                raise ValueError(f"--model {name}={path}: no such file")
        from ReCoKDLib.outputs import check_destination

        cases, table = _cases(args)
        check_destination(args.out, "--out", folder=True)
        metrics = evaluate_models(dict(args.model), cases, args.out, device=args.device, overlap=args.overlap,
                                  mirror=args.mirror, latency_repeats=args.latency_repeats,
                                  training_logs=dict(args.log) or None, reporter=reporter, reference_labels=table,
                                  inference=inference_kwargs(args))
        if args.progress != "json":
            print(format_table(metrics), file=sys.stdout)

    return run_command(args, STAGE, job, memory_hint="--latency-repeats (0 skips the latency runs), or evaluate "
                                                      "one model at a time; on a GPU, --device cpu has more memory")
