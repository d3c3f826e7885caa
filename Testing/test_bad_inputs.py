"""Bad inputs and faults (issue 18): no error passes silently, nothing is lost.

Each test tries what a user (or a full disk) does and asserts what they see: permissions that follow
the umask, NaN/inf voxels refused or replaced with a count, truncated files refused, classes matched
by name, implausible geometry warned, a full disk that fails the write and keeps the previous file,
an output that is the input refused, an unwritable destination found before inference, clear
messages instead of tracebacks. Real data: the 32x64x64 crop of the real S1 CT (``tiny_ct_case``).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from ReCoKDLib.checkpoint import OutputWriteError, atomic_write_text, create_temp_dir
from ReCoKDLib.cli import main
from ReCoKDLib.data.io import (
    Geometry,
    InputWarning,
    NonFiniteVoxelsError,
    TruncatedImageError,
    nonfinite_policy,
    read_image,
    write_image,
)

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
CLASSES = ["background", "liver", "other"]


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def ct(tiny_ct_case):
    """``(image int16 (32, 64, 64), label with 3 classes, geometry, image path)`` of the real CT crop."""
    image, geometry = read_image(tiny_ct_case.image_paths[0], allow_channels=False)
    label, _ = read_image(tiny_ct_case.label_path, allow_channels=False)
    three = np.where(label == 1, 1, np.where(label > 1, 2, 0)).astype(np.uint8)
    return image, three, geometry, Path(tiny_ct_case.image_paths[0])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A tiny 3-class U-Net (random weights) with a 3 mm CT card, as a ReCoKD model file."""
    import torch

    from ReCoKDLib.checkpoint import ModelCard, save_model
    from ReCoKDLib.networks import build_unet, preset

    torch.manual_seed(0)
    config = preset("tiny", num_classes=3)
    card = ModelCard(architecture={"kind": "dynunet", "config": config.to_dict()}, classes=CLASSES,
                     spacing=[3.0, 3.0, 3.0], normalization={"scheme": "ct", "mean": 40.0, "std": 150.0,
                                                              "clip": [-200.0, 300.0]}, patch_size=[16, 32, 32])
    return save_model(tmp_path_factory.mktemp("model") / "tiny.pt", build_unet(config).state_dict(), card)


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _segment(capsys, model_path, image, out, *extra, progress="json"):
    code = main(["segment", str(model_path), str(image), str(out), "--device", "cpu", "--progress", progress, *extra])
    captured = capsys.readouterr()
    return code, _events(captured.out), captured.err


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=timeout,
                          cwd=str(Path(__file__).resolve().parents[1]))


# ---------------------------------------------------------------------------------------------
# 2. Permissions follow the umask


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, ct, model_path, capsys, umask, mode):
    image, _, geometry, image_path = ct
    old = os.umask(umask)
    try:
        files = [write_image(image, geometry, tmp_path / f"a{s}") for s in (".nii.gz", ".nrrd", ".mha", ".nii")]
        files.append(atomic_write_text(tmp_path / "card.json", "{}"))
        assert _segment(capsys, model_path, image_path, tmp_path / "seg.nii.gz", progress="none")[0] == 0
        files.append(tmp_path / "seg.nii.gz")
        folder = create_temp_dir(tmp_path, prefix="built-")
    finally:
        os.umask(old)
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, path
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~umask


def test_a_replaced_output_keeps_its_mode(tmp_path, ct):
    image, _, geometry, _ = ct
    path = write_image(image, geometry, tmp_path / "seg.nrrd")
    os.chmod(path, 0o640)
    write_image(image[:4], geometry, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and read_image(path)[0].shape == (4, 64, 64)


# ---------------------------------------------------------------------------------------------
# 3. NaN / inf voxels


@pytest.fixture(params=[".nii.gz", ".nrrd", ".mha"])
def nan_ct(ct, tmp_path, request):
    """The CT as float32 with 3 NaN and 2 infinite voxels (ITK's NIfTI reader would make them 0 unseen)."""
    image, _, geometry, _ = ct
    bad = image.astype(np.float32)
    bad[10, 20, 30:33] = np.nan
    bad[5, 5, 5] = np.inf
    bad[6, 6, 6] = -np.inf
    return bad, write_image(bad, geometry, tmp_path / f"nan_ct{request.param}")


def test_nonfinite_voxels_are_refused_with_their_count(nan_ct, model_path, tmp_path, capsys):
    bad, path = nan_ct
    with pytest.raises(NonFiniteVoxelsError, match=r"3 NaN and 2 infinite voxel\(s\)") as info:
        read_image(path)
    assert str(path) in str(info.value) and "--replace-nonfinite" in str(info.value)
    out = tmp_path / "seg.nii.gz"
    code, events, err = _segment(capsys, model_path, path, out)
    assert code == 2 and not out.exists()
    assert [e["event"] for e in events] == ["error"] and "3 NaN and 2 infinite" in events[0]["message"]
    # arrays that never were files (the Slicer panel, the web app) are refused in preprocessing
    from ReCoKDLib.data.preprocess import preprocess_case

    with pytest.raises(ValueError, match="3 NaN and 2 infinite"):
        preprocess_case(bad, Geometry(), [3, 3, 3], {"scheme": "zscore"})


def test_nonfinite_voxels_are_replaced_on_request_and_said(nan_ct, ct, model_path, tmp_path, capsys):
    bad, path = nan_ct
    out = tmp_path / "seg.nii.gz"
    code, events, _ = _segment(capsys, model_path, path, out, "--replace-nonfinite", "min")
    assert code == 0
    warned = [e["message"] for e in events if e["event"] == "warning"]
    assert any("replaced 3 NaN and 2 infinite voxel(s)" in m and str(path) in m for m in warned), warned
    fixed = np.where(np.isfinite(bad), bad, np.nanmin(np.where(np.isinf(bad), np.nan, bad)))
    reference = write_image(fixed, ct[2], tmp_path / "fixed.nii.gz")
    assert _segment(capsys, model_path, reference, tmp_path / "ref_seg.nii.gz")[0] == 0
    np.testing.assert_array_equal(read_image(out)[0], read_image(tmp_path / "ref_seg.nii.gz")[0])
    with nonfinite_policy(0):
        assert np.isfinite(read_image(path)[0]).all()


# ---------------------------------------------------------------------------------------------
# 4. Truncated files


@pytest.mark.parametrize("suffix,compress", [(".nii", False), (".nii.gz", True), (".nrrd", False), (".nrrd", True),
                                             (".mha", False), (".mha", True)])
def test_a_truncated_image_file_is_refused_by_name(tmp_path, ct, suffix, compress):
    image, _, geometry, _ = ct
    path = write_image(image, geometry, tmp_path / f"ct{suffix}", compress=compress)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(TruncatedImageError, match="is incomplete") as info:
        read_image(path)
    assert str(path) in str(info.value) and "copy or export it again" in str(info.value)


def test_complete_files_written_by_other_tools_are_not_called_truncated(tmp_path, ct):
    image, _, geometry, _ = ct
    path = write_image(image, geometry, tmp_path / "ct.nii.gz")
    raw = gzip.decompress(path.read_bytes())
    variants = {
        "members.nii.gz": gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]),  # several gzip members (bgzip)
        "padded.nii.gz": gzip.compress(raw) + b"\0" * 64,  # zero padding after the stream
        "longer.nii": raw + b"\0" * 16,  # bytes after the voxel data
    }
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
        np.testing.assert_array_equal(read_image(tmp_path / name)[0], image, err_msg=name)


def test_segment_refuses_a_truncated_scan(tmp_path, ct, model_path, capsys):
    image, _, geometry, _ = ct
    path = write_image(image, geometry, tmp_path / "ct.nii.gz")
    path.write_bytes(path.read_bytes()[:-4000])
    code, events, _ = _segment(capsys, model_path, path, tmp_path / "seg.nii.gz")
    assert code == 2 and "is incomplete" in events[-1]["message"] and str(path) in events[-1]["message"]


# ---------------------------------------------------------------------------------------------
# 5. evaluate matches classes by name


@pytest.fixture()
def eval_files(ct, tmp_path):
    image, label, geometry, image_path = ct
    swapped = np.where(label == 1, 2, np.where(label == 2, 1, 0)).astype(np.uint8)  # liver = 2, other = 1
    return {
        "image": image_path,
        "right": write_image(label, geometry, tmp_path / "ref_right.nii.gz"),
        "swapped": write_image(swapped, geometry, tmp_path / "ref_swapped.nii.gz"),
        "table": json.dumps({"background": 0, "Other": 1, "liver": 2}),
    }


def _dice(tmp_path, name, model_path, pairs, *extra):
    out = tmp_path / name
    code = main(["evaluate", "--model", f"m={model_path}", "--pairs", *pairs, "--out", str(out), "--device", "cpu",
                 "--latency-repeats", "0", "--progress", "none", *extra])
    return code, (json.loads((out / "metrics.json").read_text())["m"]["dice"] if code == 0 else None)


def test_evaluate_matches_classes_by_name(eval_files, model_path, tmp_path, capsys):
    f = eval_files
    code, right = _dice(tmp_path, "right", model_path, [f"{f['image']}:{f['right']}"])
    assert code == 0 and "come without class names" in capsys.readouterr().err  # values assumed: said so
    code, by_name = _dice(tmp_path, "named", model_path, [f"{f['image']}:{f['swapped']}"], "--reference-labels",
                          f["table"])
    assert code == 0 and by_name == right
    code, by_value = _dice(tmp_path, "unnamed", model_path, [f"{f['image']}:{f['swapped']}"])
    assert code == 0 and by_value != right  # what matching by value would have reported


def test_evaluate_reads_slicer_segment_names(eval_files, ct, model_path, tmp_path, capsys):
    import SimpleITK as sitk

    from ReCoKDLib.data.io import to_sitk

    image, label, geometry, _ = ct
    swapped = read_image(eval_files["swapped"])[0]
    seg = to_sitk(swapped, geometry)
    for n, (name, value) in enumerate((("other", 1), ("Liver", 2))):
        seg.SetMetaData(f"Segment{n}_Name", name)
        seg.SetMetaData(f"Segment{n}_LabelValue", str(value))
    path = tmp_path / "ref.seg.nrrd"
    sitk.WriteImage(seg, str(path), True)
    code, right = _dice(tmp_path, "right", model_path, [f"{eval_files['image']}:{eval_files['right']}"])
    code2, from_file = _dice(tmp_path, "seg", model_path, [f"{eval_files['image']}:{path}"])
    assert code == code2 == 0 and from_file == right


def test_evaluate_refuses_classes_it_cannot_match(eval_files, model_path, tmp_path, capsys):
    f = eval_files
    code, _ = _dice(tmp_path, "x", model_path, [f"{f['image']}:{f['swapped']}"], "--reference-labels",
                    json.dumps({"background": 0, "spleen": 1, "liver": 2}))
    err = capsys.readouterr().err
    assert code == 2 and "['other'] are not in" in err and "spleen" in err
    # a reference class the model does not have counts as background, with a warning
    code, _ = _dice(tmp_path, "y", model_path, [f"{f['image']}:{f['swapped']}"], "--reference-labels",
                    json.dumps({"background": 0, "other": 1, "liver": 2, "kidney": 3}))
    assert code == 0 and "no class ['kidney']" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 6. Implausible geometry


@pytest.mark.parametrize("spacing,expect", [((0.001, 0.001, 0.001), r"z 0\.001 mm.*becomes \(1, 1, 1\)"),
                                            ((3.0, 3.0, 100.0), r"z 100 mm.*becomes \(1067, 64, 64\)")])
def test_implausible_spacing_is_warned_with_what_will_happen(ct, spacing, expect):
    from ReCoKDLib.data.preprocess import ImplausibleGeometryWarning, preprocess_case

    image = ct[0]
    with pytest.warns(ImplausibleGeometryWarning, match=expect):
        preprocess_case(image, Geometry(spacing), [3.0, 3.0, 3.0], {"scheme": "zscore"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        preprocess_case(image, ct[2], [3.0, 3.0, 3.0], {"scheme": "zscore"})  # the real CT: nothing to say


def test_a_2d_image_given_to_a_3d_model_is_warned(ct, model_path, tmp_path, capsys):
    image, _, geometry, _ = ct
    path = write_image(image[16:17], geometry, tmp_path / "slice.nii.gz")
    code, events, _ = _segment(capsys, model_path, path, tmp_path / "seg.nii.gz")
    assert code == 0
    warned = [e["message"] for e in events if e["event"] == "warning"]
    assert any("only 1 voxel(s) along z" in m and "2-D data" in m for m in warned), warned


# ---------------------------------------------------------------------------------------------
# 7. A full disk


def _mount_tmpfs(folder: Path, size: str, options: str = "") -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(folder)],
                            capture_output=True)
    return result.returncode == 0


@pytest.fixture()
def full_disk(tmp_path):
    """A 64 KiB file system (tmpfs; root only): a real full disk."""
    folder = tmp_path / "small_disk"
    if not _mount_tmpfs(folder, "64k"):
        pytest.skip("mounting a small tmpfs needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def _noise(shape=(40, 50, 60)) -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 1000, shape).astype(np.int16)  # ~180 KB compressed


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".nii"])
def test_a_full_disk_fails_the_write_and_keeps_the_previous_file(full_disk, suffix):
    target = full_disk / f"seg{suffix}"
    previous = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    write_image(previous, Geometry(), target)
    with pytest.raises(OutputWriteError) as info:
        write_image(_noise(), Geometry(), target)
    message = str(info.value)
    assert str(target) in message and "the previous file is kept" in message and "MiB free" in message
    assert sorted(p.name for p in full_disk.iterdir()) == [target.name]  # no partial or temporary file
    np.testing.assert_array_equal(read_image(target)[0], previous)


_FSIZE_WRITE = """
import os, resource, signal, sys
import numpy as np
from ReCoKDLib.data.io import Geometry, write_image
from ReCoKDLib.checkpoint import OutputWriteError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
noise = np.random.default_rng(0).integers(-1000, 1000, (40, 50, 60)).astype(np.int16)
limit = 64 * 1024
if sys.argv[2] == "last":  # only the last 100 bytes do not fit: ITK's NIfTI and NRRD writers say nothing
    probe = write_image(noise, Geometry(), sys.argv[3])
    limit = os.path.getsize(probe) - 100
    os.unlink(probe)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    write_image(noise, Geometry(), sys.argv[1])
except OutputWriteError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize("cut", ["early", "last"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".nii"])
def test_a_file_size_limit_fails_the_write_and_keeps_the_previous_file(tmp_path, suffix, cut):
    """The same fault for everyone (no root needed): writes past RLIMIT_FSIZE fail with EFBIG."""
    target = tmp_path / f"seg{suffix}"
    write_image(np.ones((4, 5, 6), np.int16), Geometry(), target)
    before = target.read_bytes()
    probe = tmp_path.parent / f"{tmp_path.name}_probe{suffix}"
    result = subprocess.run([sys.executable, "-c", _FSIZE_WRITE, str(target), cut, str(probe)], capture_output=True,
                            text=True, env=ENV, timeout=120)
    assert "REFUSED cannot write" in result.stdout and "the previous file is kept" in result.stdout, (
        result.stdout + result.stderr)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".nii"])
def test_a_writer_that_loses_the_end_silently_is_caught(tmp_path, suffix, monkeypatch):
    """ITK's writers do not always report a short write (seen for .nii, .nii.gz, gzip .nrrd and compressed
    .mha on a full disk): the file is checked against its header before it replaces anything."""
    import SimpleITK as sitk

    target = write_image(np.ones((4, 5, 6), np.int16), Geometry(), tmp_path / f"seg{suffix}")
    before = target.read_bytes()
    real = sitk.WriteImage

    def loses_the_end(image, path, *args, **kwargs):
        real(image, path, *args, **kwargs)
        os.truncate(path, os.path.getsize(path) - 100)

    monkeypatch.setattr(sitk, "WriteImage", loses_the_end)
    with pytest.raises(OutputWriteError, match="the written file is incomplete"):
        write_image(_noise(), Geometry(), target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_segment_on_a_full_disk_exits_1_and_leaves_no_output(tmp_path, ct, model_path):
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from ReCoKDLib.cli import main
sys.exit(main(["segment", {str(model_path)!r}, {str(ct[3])!r}, {str(tmp_path / 'out' / 'seg.mha')!r},
               "--device", "cpu", "--progress", "none"]))
"""
    (tmp_path / "out").mkdir()
    result = _python(code)
    assert result.returncode == 1, result.stderr
    assert "cannot write" in result.stderr and "seg.mha" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1
    assert list((tmp_path / "out").iterdir()) == []


def test_a_cache_write_error_names_the_cache(tmp_path):
    code = f"""
import resource, signal
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from ReCoKDLib.data.sampling import CaseCache, CaseArrays
cache = CaseCache({str(tmp_path / 'cache')!r})
case = CaseArrays("c0", np.zeros((1, 40, 50, 60), np.float32), np.zeros((40, 50, 60), np.int16), {{}}, {{}}, True)
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    cache.store("key0", case)
except OSError as exc:
    print("ERROR", exc)
"""
    result = _python(code)
    assert f"ERROR cannot write {tmp_path / 'cache' / 'key0'}" in result.stdout, result.stdout + result.stderr
    assert "--cache-dir" in result.stdout
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


# ---------------------------------------------------------------------------------------------
# 8. The output is the input; 11. an unwritable destination


def test_segment_refuses_to_overwrite_its_input(tmp_path, ct, model_path, capsys):
    scan = tmp_path / "scan.nii.gz"
    shutil.copy(ct[3], scan)
    original = scan.read_bytes()
    (tmp_path / "link.nii.gz").symlink_to(scan)
    os.link(scan, tmp_path / "hard.nii.gz")
    for out, extra in ((scan, []), (tmp_path / "link.nii.gz", []), (tmp_path / "hard.nii.gz", []),
                       (tmp_path / "seg.nii.gz", ["--probabilities", str(scan)])):
        code, events, _ = _segment(capsys, model_path, scan, out, *extra)
        assert code == 2 and "would destroy the input" in events[-1]["message"], events
        assert [e["event"] for e in events] == ["error"]  # refused before the model ran
        assert scan.read_bytes() == original
    code, _, _ = _segment(capsys, model_path, scan, scan, "--overwrite-input")
    assert code == 0 and read_image(scan)[0].dtype == np.uint8  # asked for explicitly: done


def test_an_unwritable_destination_is_found_before_inference(tmp_path, ct, model_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    targets = [blocker / "seg.nii.gz"]
    read_only = tmp_path / "read_only"
    if _mount_tmpfs(read_only, "1m", ",ro"):
        targets.append(read_only / "seg.nii.gz")
    elif os.geteuid() != 0:
        read_only.mkdir(mode=0o555)
        targets.append(read_only / "seg.nii.gz")
    try:
        for target in targets:
            code, events, _ = _segment(capsys, model_path, ct[3], target)
            assert code == 2 and [e["event"] for e in events] == ["error"], events  # no preprocessing, no windows
            assert "cannot write OUT" in events[0]["message"] and str(target) in events[0]["message"]
        for command in (["evaluate", "--model", f"m={model_path}", "--pairs", f"{ct[3]}:{ct[3]}"],
                        ["inspect", "--image", str(ct[3]), "--teacher", str(model_path), "--student",
                         str(model_path), "--no-png"], ["export", str(model_path)]):
            assert main([*command, "--out", str(blocker / "out"), "--progress", "none"]) == 2
            assert "is a file, not a folder" in capsys.readouterr().err
    finally:
        if read_only.is_mount():
            subprocess.run(["umount", str(read_only)], check=False)


# ---------------------------------------------------------------------------------------------
# 10. Messages, not tracebacks


def test_dataset_json_with_labels_as_a_list_is_named(tmp_path, capsys):
    from ReCoKDLib.data.layout import DatasetLayoutError, RawDataset

    folder = tmp_path / "Dataset001_X"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": ["background", "liver"], "file_ending": ".nii.gz", "numTraining": 0}))
    with pytest.raises(DatasetLayoutError, match=r"'labels' must be a JSON object like \{\"background\": 0"):
        RawDataset.open(folder)
    assert main(["train-teacher", "--data", str(folder), "--out", str(tmp_path / "run"), "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "'labels' must be a JSON object" in err and "Traceback" not in err and err.count("error:") == 1


def test_inspect_with_another_teacher_says_so(tmp_path, ct, capsys):
    import torch

    from ReCoKDLib.checkpoint import ModelCard, atomic_torch_save, save_model
    from ReCoKDLib.losses.registry import build_kd_loss
    from ReCoKDLib.networks import build_unet, derive_student_config, encoder_tap_names, preset
    from ReCoKDLib.taps import DistillationPair

    def card(config, role, kd=None):
        return ModelCard(architecture={"kind": "dynunet", "config": config.to_dict()}, classes=CLASSES,
                         spacing=[3.0] * 3, normalization={"scheme": "zscore"}, patch_size=[16, 32, 32], role=role,
                         tap_names=encoder_tap_names(config), kd=kd or {})

    torch.manual_seed(0)
    teacher = preset("tiny", num_classes=3)
    student = derive_student_config(teacher, reduction=2, min_channels=4)
    other = preset("tiny", num_classes=3, filters=(16, 32, 64))  # same classes, another teacher
    kd = {"methods": {"recokd": {"weight": 1.0}}, "teacher_taps": encoder_tap_names(teacher),
          "student_taps": encoder_tap_names(student)}
    student_path = save_model(tmp_path / "student" / "model_last.pt", build_unet(student).state_dict(),
                              card(student, "student", kd))
    other_path = save_model(tmp_path / "other.pt", build_unet(other).state_dict(), card(other, "teacher"))
    pair = DistillationPair(build_unet(teacher), build_unet(student), kd["teacher_taps"], kd["student_taps"],
                            (1, 16, 32, 32))
    loss = build_kd_loss("recokd", teacher_channels=pair.teacher_channels, student_channels=pair.student_channels,
                         num_classes=3)
    atomic_torch_save({"job": "distill", "aux": {"adapters": pair.adapters.state_dict(), "kd_loss": {
        f"losses.recokd.{k}": v for k, v in loss.state_dict().items()}}}, tmp_path / "student" / "checkpoint.pt")
    out = tmp_path / "inspect"
    code = main(["inspect", "--image", str(ct[3]), "--teacher", str(other_path), "--student", str(student_path),
                 "--out", str(out), "--no-png", "--device", "cpu", "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "do not fit this teacher" in err and "distilled from" in err and "Traceback" not in err
    assert not out.exists()


def test_out_of_memory_says_how_much_and_what_to_lower(tmp_path, ct, model_path, capsys, monkeypatch):
    import torch

    import ReCoKDLib.infer as infer

    for allocate, size in ((lambda: np.empty((10**5,) * 3), "7.11 PiB"), (lambda: torch.empty(2**50), "4 PiB")):
        monkeypatch.setattr(infer, "segment_file", lambda *a, **k: allocate())
        code, events, err = _segment(capsys, model_path, ct[3], tmp_path / "seg.nii.gz")
        message = events[-1]["message"]
        assert code == 1 and message.startswith("out of memory") and size in message, message
        assert "--sw-batch-size" in message and "--roi" in message and err.count("error:") == 1


# ---------------------------------------------------------------------------------------------
# 11. "checkpoint intact" only when there is one


@pytest.mark.parametrize("nan_from,checkpoint_every,expect", [
    (1, 50, r"No checkpoint was written before it \(there is nothing to resume\)"),
    (4, 1, r"The last good checkpoint .*checkpoint\.pt \(step \d+\) is intact"),
])
def test_a_diverged_run_calls_a_checkpoint_intact_only_when_there_is_one(tiny_ct_case, ct_dataset, tmp_path,
                                                                         monkeypatch, nan_from, checkpoint_every,
                                                                         expect):
    import torch

    import ReCoKDLib.engine.loop as loop
    from ReCoKDLib.data.preprocess import preprocess_case
    from ReCoKDLib.data.sampling import prepare_cases
    from ReCoKDLib.engine import TrainConfig, TrainingDivergedError, train_teacher
    from ReCoKDLib.networks import preset

    cases = prepare_cases([tiny_ct_case], ct_dataset.class_names, preprocess_case,
                          {"spacing": [3.0, 3.0, 3.0], "normalization": {"scheme": "zscore"}}, tmp_path / "cache")
    real, calls = loop.pseudo_weighted_seg_loss, [0]

    def diverging(*args, **kwargs):  # the loss turns NaN from step `nan_from` on
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * torch.tensor(float("nan")) if calls[0] >= nan_from else loss

    monkeypatch.setattr(loop, "pseudo_weighted_seg_loss", diverging)
    config = TrainConfig(network=preset("tiny").to_dict(), patch_size=(16, 32, 32), batch_size=1, steps=20,
                         num_val_cases=0, checkpoint_every=checkpoint_every, max_nonfinite=2, optimizer="adamw",
                         lr=1e-3, augmentation={"enabled": False})
    with pytest.raises(TrainingDivergedError, match=expect) as info:
        train_teacher(config, cases, tmp_path / "run")
    assert ("intact" in str(info.value)) == (tmp_path / "run" / "checkpoint.pt").is_file()
