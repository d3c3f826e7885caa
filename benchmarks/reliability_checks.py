"""What the checks of issue 18 cost on whole real CT scans, next to what they guard.

For the real S1 (abdomen-pelvis, 112x101x122 int16, ``Dataset901_CTAbdomenOrgans/imagesTr``) and
S3 (upper abdomen, 20x512x512, ``imagesTs``) CTs of ``recokd data fetch --only ct``, each check is
timed alone and next to the operation it belongs to, in the same run (medians of ``--reps``,
interleaved):

* **read**: ``SimpleITK.ReadImage`` alone vs :func:`ReCoKDLib.data.io.read_image` (header vs file
  size / gzip trailer, NaN/inf count; for float NIfTI also the scan of the file's own bytes, since
  ITK reads NaN as 0): for the int16 CT and for the same CT stored as float32;
* **write**: the old write (SimpleITK into a temporary file, rename) vs :func:`write_image` (plus
  the completeness check of what was written and ``fsync``), for the label map and the CT;
* **preprocess**: the NaN/inf check and the geometry plausibility check inside
  ``preprocess_case`` vs the whole ``preprocess_case`` on the model's spacing;
* **segment**: the destination probe, the output-is-input check and the umask-following
  temporary file vs a whole ``recokd segment`` run (a small random U-Net: real models take longer,
  so the share shown is an upper bound);
* **run folder lock** (acquire + release) and **evaluate's renumbering** by class name.

Usage:
    python benchmarks/reliability_checks.py [--reps 7] [--out benchmarks/results/reliability_checks.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import RESULTS_DIR, BenchmarkError, median, provenance, write_json  # noqa: E402


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _pair(baseline: Callable[[], Any], checked: Callable[[], Any], reps: int) -> dict[str, float]:
    """Medians of interleaved runs of both, in ms, and the checked/baseline ratio."""
    a, b = [], []
    baseline(), checked()  # warm the page cache and imports
    for _ in range(reps):
        a.append(_time(baseline))
        b.append(_time(checked))
    base, check = median(a) * 1e3, median(b) * 1e3
    return {"baseline_ms": round(base, 3), "with_checks_ms": round(check, 3), "ratio": round(check / base, 4)}


def _alone(fn: Callable[[], Any], reps: int) -> float:
    fn()
    return round(median([_time(fn) for _ in range(reps)]) * 1e3, 4)


def _old_write(image, path: Path, compress: bool) -> None:
    """``write_image`` before issue 18: SimpleITK into a temporary file beside the target, then rename."""
    import SimpleITK as sitk

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    sitk.WriteImage(image, tmp, useCompression=compress)
    os.replace(tmp, path)


def measure_scan(name: str, image_path: Path, label_path: Path | None, work: Path, reps: int, model) -> dict[str, Any]:
    import SimpleITK as sitk

    from ReCoKDLib.checkpoint import create_temp_file
    from ReCoKDLib.commands.segment import _check_destinations
    from ReCoKDLib.data.image_files import incomplete_reason, nifti_nonfinite_voxels
    from ReCoKDLib.data.io import _verify_written, count_nonfinite, read_image, to_sitk, write_image
    from ReCoKDLib.data.preprocess import _spacing_dhw, as_channels, check_finite, geometry_warnings, preprocess_case
    from ReCoKDLib.infer import segment_file

    image, geometry = read_image(image_path)
    float_path = write_image(image.astype(np.float32), geometry, work / f"{name}_float.nii.gz")
    result: dict[str, Any] = {"file": str(image_path), "shape_dhw": list(image.shape), "dtype": str(image.dtype),
                              "spacing_xyz": list(geometry.spacing)}

    result["read_int16"] = _pair(lambda: sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))),
                                 lambda: read_image(image_path), reps)
    result["read_int16"]["completeness_ms"] = _alone(lambda: incomplete_reason(image_path), reps)
    result["read_int16"]["nonfinite_count_ms"] = _alone(lambda: count_nonfinite(image), reps)
    result["read_float32"] = _pair(lambda: sitk.GetArrayFromImage(sitk.ReadImage(str(float_path))),
                                   lambda: read_image(float_path), reps)
    as_float = image.astype(np.float32)
    result["read_float32"]["nonfinite_count_ms"] = _alone(lambda: count_nonfinite(as_float), reps)
    result["read_float32"]["nifti_bytes_scan_ms"] = _alone(lambda: nifti_nonfinite_voxels(float_path), reps)

    label = read_image(label_path)[0] if label_path is not None else np.zeros(image.shape, np.uint8)
    for what, array, compress in (("write_label_nii_gz", label.astype(np.uint8), True),
                                  ("write_ct_nii_gz", image, True)):
        target = work / f"{name}_{what}.nii.gz"
        sitk_image = to_sitk(array, geometry)
        result[what] = _pair(lambda: _old_write(sitk_image, target, compress),
                             lambda: write_image(array, geometry, target), reps)
        result[what]["verify_and_fsync_ms"] = _alone(lambda: _verify_written(target, target), reps)

    spacing = [3.0, 1.5, 1.5]
    normalization = {"scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 40.0, "std": 300.0}
    result["preprocess"] = {
        "preprocess_case_ms": _alone(lambda: preprocess_case(image, geometry, spacing, normalization), max(3, reps // 2)),
        "nonfinite_check_ms": _alone(lambda: check_finite(as_channels(image), "image"), reps),
        "nonfinite_check_float32_ms": _alone(lambda: check_finite(as_channels(as_float), "image"), reps),
        "geometry_check_ms": _alone(lambda: geometry_warnings(image.shape, _spacing_dhw(geometry), spacing), reps),
    }

    out = work / f"{name}_seg.nii.gz"
    args = argparse.Namespace(out=str(out), probabilities=None, dicom_seg=None, png=None, summary=None, channel=[],
                              model=str(model.source), overwrite_input=False)
    result["segment"] = {
        "segment_file_ms": _alone(lambda: segment_file(model, image_path, out, device="cpu"), max(3, reps // 2)),
        "destination_checks_ms": _alone(lambda: _check_destinations(args, [image_path]), reps),
        "umask_temp_file_ms": _alone(lambda: os.unlink(create_temp_file(work)), reps),
    }
    if label_path is not None:
        from ReCoKDLib.evaluate import _renumber

        table = {"background": 0, **{f"c{i}": i for i in range(1, int(label.max()) + 1)}}
        classes = list(table)
        result["evaluate_renumber_ms"] = _alone(
            lambda: _renumber(label, classes, Path(label_path), "m", table, {"unnamed"}), reps)
    return result


def _tiny_model(work: Path):
    import torch

    from ReCoKDLib.checkpoint import ModelCard, save_model
    from ReCoKDLib.networks import build_unet, preset
    from ReCoKDLib.teachers import load_model

    torch.manual_seed(0)
    config = preset("tiny", num_classes=12)
    card = ModelCard(architecture={"kind": "dynunet", "config": config.to_dict()}, classes=[f"c{i}" for i in range(12)],
                     spacing=[3.0, 1.5, 1.5], normalization={"scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 40.0,
                                                             "std": 300.0}, patch_size=[32, 64, 64])
    return load_model(save_model(work / "tiny.pt", build_unet(config).state_dict(), card))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per measurement (default 7)")
    parser.add_argument("--data", default=None, help="data folder (default: recokd data fetch's)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "reliability_checks.json"))
    args = parser.parse_args(argv)

    import torch

    from ReCoKDLib.data.fetch import default_data_dir
    from ReCoKDLib.runlock import RunFolderLock

    root = Path(args.data).expanduser() if args.data else default_data_dir()
    dataset = root / "Dataset901_CTAbdomenOrgans"
    scans = {"S1": ("imagesTr/totalseg_s1_0000.nii.gz", "labelsTr/totalseg_s1.nii.gz"),
             "S3": ("imagesTs/totalseg_s3_0000.nii.gz", "labelsTs/totalseg_s3.nii.gz")}
    if not all((dataset / image).is_file() for image, _ in scans.values()):
        raise BenchmarkError(f"{dataset} lacks the CT scans; run `recokd data fetch --only ct` first")
    work = Path(tempfile.mkdtemp(prefix="recokd-reliability-"))
    try:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        model = _tiny_model(work)
        results = {name: measure_scan(name, dataset / image, dataset / label, work, args.reps, model)
                   for name, (image, label) in scans.items()}
        lock_folder = work / "run"
        results["run_folder_lock_ms"] = _alone(lambda: RunFolderLock(lock_folder).__enter__().release(), args.reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data = {"provenance": provenance(torch.get_num_threads()), "reps": args.reps, "results": results}
    write_json(args.out, data)
    for name in scans:
        r = results[name]
        print(f"{name} {r['shape_dhw']} {r['dtype']}:")
        for key in ("read_int16", "read_float32", "write_label_nii_gz", "write_ct_nii_gz"):
            print(f"  {key:20s} {r[key]['baseline_ms']:9.1f} ms -> {r[key]['with_checks_ms']:9.1f} ms "
                  f"(x{r[key]['ratio']:.3f})")
        p, s = r["preprocess"], r["segment"]
        print(f"  preprocess_case {p['preprocess_case_ms']:.1f} ms; NaN check {p['nonfinite_check_ms']:.3f} ms "
              f"(float32 {p['nonfinite_check_float32_ms']:.3f}), geometry {p['geometry_check_ms']:.4f} ms")
        print(f"  segment_file {s['segment_file_ms']:.1f} ms; destination checks {s['destination_checks_ms']:.3f} ms")
    print(f"run folder lock {results['run_folder_lock_ms']:.3f} ms; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
