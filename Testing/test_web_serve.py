"""``recokd serve`` as a clinic would use it: its model catalogue, its uploads, and the page in a
real browser.

The browser test starts ``recokd serve`` in a subprocess on a free loopback port with tiny real
models (a teacher and its distilled student, both saved as ``model_last.pt`` in their run folders
as the README's command gives them, a student of other classes, and a model that cannot segment
a one-channel CT), drives Debian's Chromium through Playwright (never a downloaded browser) and
checks each step on the rendered view and on the page: every error appears at the top of the
views (where the eye is, not at the bottom of the drawer) and leaves the last good view as it was.
It ends with the real S3 DICOM series uploaded as a zip, segmented, and downloaded as a DICOM SEG
whose voxels equal ``recokd segment``'s on the same series. Screenshots are saved under pytest's
tmp dir (the path is printed); ``RECOKD_SCREENSHOT_DIR`` also keeps a full-page one there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CLASSES = ["background", "liver", "spleen"]


def _save_model(path: Path, reduction: int = 1, seed: int = 0, role: str = "teacher", classes=CLASSES,
                colors=(), **card_fields) -> Path:
    """A tiny DynUNet on the CT crop's own 3 mm grid (a few sliding windows on one core)."""
    import torch

    from ReCoKDLib import checkpoint, networks

    torch.manual_seed(seed)
    config = networks.preset("tiny", num_classes=len(classes))
    if reduction > 1:
        config = networks.derive_student_config(config, reduction)
    network = networks.build_unet(config)
    with torch.no_grad():  # a small bias so that the liver class shows up beside the others
        last = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        last.bias[1] += 0.5
    card = checkpoint.ModelCard(
        architecture={"kind": "dynunet", "config": config.to_dict()}, classes=list(classes), spacing=[3.0, 3.0, 3.0],
        normalization={"scheme": "zscore"}, patch_size=[16, 32, 32], role=role,
        tap_names=networks.encoder_tap_names(config), colors=[list(c) for c in colors], **card_fields)
    return checkpoint.save_model(path, network.state_dict(), card)


def _distilled_student(path: Path, teacher: Path, **kwargs) -> Path:
    from ReCoKDLib.checkpoint import sha256_file

    return _save_model(path, reduction=2, seed=1, role="student", kd={"methods": {"recokd": {"weight": 1.0}}},
                       provenance={"teacher_sha256": sha256_file(teacher)}, **kwargs)


# --------------------------------------------------------------------------------------------
# catalogue (no server)


def test_catalogue_titles_models_from_their_cards(tmp_path):
    from ReCoKDLib.web.catalogue import CatalogueError, check_pair, find_models

    runs = tmp_path / "runs"
    teacher = _save_model(runs / "teacher" / "model_last.pt")
    student = _distilled_student(runs / "distilled" / "model_last.pt", teacher)
    (runs / "distilled" / "checkpoint.pt").write_bytes(b"training state, not a model")
    found = find_models([student, teacher], presets=False)
    assert [c.source for c in found] == [str(student), str(teacher)]
    titles = [c.title for c in found]
    assert len(set(titles)) == 2, titles  # the README's command no longer shows model_last.pt twice
    assert titles[0].startswith("student (ReCo-KD) · liver, spleen · 0.") and "M parameters" in titles[0]
    assert titles[0].endswith("· distilled from teacher/model_last.pt — distilled/model_last.pt"), titles[0]
    assert titles[1].startswith("teacher · liver, spleen · ") and titles[1].endswith("— teacher/model_last.pt")
    assert [c.role for c in found] == ["student", "teacher"]
    from ReCoKDLib.teachers import load_model

    for choice in found:  # DynUNet saves shared modules twice: each parameter is counted once
        network = load_model(choice.source, "cpu").network
        count = sum(p.numel() for p in network.parameters())
        assert f" · {count / 1e6:.2f} M parameters" in choice.title, (choice.title, count)
    assert found[0].classes == tuple(CLASSES)
    # a folder of runs: the same models, checkpoint.pt (training state) skipped
    assert sorted(c.source for c in find_models([runs], presets=False)) == sorted([str(teacher), str(student)])
    # pairs: the same classes belong together, other classes and the same model do not
    brain = _save_model(runs / "brain" / "model_last.pt", role="student", classes=["background", "brain"])
    by_source = {c.source: c for c in find_models([teacher, student, brain], presets=False)}
    assert check_pair(by_source[str(teacher)], by_source[str(student)]) == ""
    assert "different classes" in check_pair(by_source[str(teacher)], by_source[str(brain)])
    assert "the same model" in check_pair(by_source[str(teacher)], by_source[str(teacher)])
    alone = find_models([student], presets=False)[0]
    assert "distilled from a teacher not listed here (sha256 " in alone.title
    if importlib.util.find_spec("ReCoKDLib.nnunet") is not None:
        from test_scene_logic import fake_nnunet_folder

        folder = fake_nnunet_folder(tmp_path / "nnunet_results")
        for given in (folder, tmp_path / "nnunet_results"):  # the folder itself, or a folder above it
            (choice,) = find_models([given], presets=False)
            assert (choice.source, choice.kind, choice.role) == (str(folder), "nnunet", "teacher")
            assert choice.title.startswith("nnU-Net teacher")
    from ReCoKDLib.mrml.logic import available_presets

    assert [c.source for c in find_models([], presets=True)] == [f"preset:{n}" for n in available_presets()]
    with pytest.raises(CatalogueError, match="does not exist"):
        find_models([tmp_path / "missing.pt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogueError, match="holds no model"):
        find_models([tmp_path / "empty"])


def test_catalogue_refuses_files_that_are_not_models(tmp_path):
    from ReCoKDLib.web.catalogue import CatalogueError, find_models

    (tmp_path / "random.pt").write_bytes(os.urandom(4096).replace(b"PK", b"pk"))
    (tmp_path / "notes.pt").write_text("my notes\n")
    for name, reason in (("random.pt", "neither a PyTorch archive"), ("notes.pt", "it is a text file")):
        with pytest.raises(CatalogueError) as info:
            find_models([tmp_path / name], presets=False)
        assert f"{tmp_path / name} is not a model file" in str(info.value) and reason in str(info.value)
        assert "arbitrary code" not in str(info.value)


@pytest.mark.parametrize("content, reason", [
    (b"\x00" * 64, "neither a PyTorch archive"), (b"these are notes, not weights\n", "it is a text file")])
def test_serve_refuses_a_file_that_is_not_a_model_at_start(tmp_path, content, reason):
    bad = tmp_path / "model_last.pt"
    bad.write_bytes(content)
    result = subprocess.run([sys.executable, "-m", "ReCoKDLib", "serve", "--model", str(bad)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"{bad} is not a model file" in result.stderr and reason in result.stderr, result.stderr


def test_serve_refuses_a_missing_model_with_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ReCoKDLib", "serve", "--model", str(tmp_path / "nope.pt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr


# --------------------------------------------------------------------------------------------
# uploads (no server)


def _fake_dicom(tag: bytes) -> bytes:
    return b"\0" * 128 + b"DICM" + tag


def test_uploads_become_an_image_file_or_a_dicom_folder(tmp_path):
    from ReCoKDLib.web.uploads import UploadError, stage_upload

    path = stage_upload([("ct.nii.gz", b"nifti bytes")], tmp_path / "a")
    assert path.name == "upload.nii.gz" and path.read_bytes() == b"nifti bytes"
    series = stage_upload([("IM0001", _fake_dicom(b"1")), ("IM0002", _fake_dicom(b"2"))], tmp_path / "b")
    assert sorted(p.read_bytes() for p in series.iterdir()) == [_fake_dicom(b"1"), _fake_dicom(b"2")]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("export/DICOMDIR", b"not a slice")
        for i in range(3):
            archive.writestr(f"export/CT/slice{i}", _fake_dicom(bytes([i])))
        archive.writestr("../escape.dcm", _fake_dicom(b"x"))  # never written outside the folder
        archive.writestr("__MACOSX/export/CT/._slice0", b"resource fork")
    folder = stage_upload([("series.zip", buffer.getvalue())], tmp_path / "c")
    assert folder.name == "CT" and len(list(folder.iterdir())) == 3
    assert not (tmp_path / "escape.dcm").exists() and not (tmp_path / "c" / "escape.dcm").exists()
    failures = {
        "a single DICOM slice": [("IM0001", _fake_dicom(b"1"))],
        "is not DICOM": [("IM0001", _fake_dicom(b"1")), ("notes.txt", b"text")],
        "upload a NIfTI": [("report.pdf", b"%PDF")],
        "not a readable zip archive": [("series.zip", b"PK broken")],
        "the upload is empty": [("ct.nii.gz", b"")],
    }
    for message, files in failures.items():
        with pytest.raises(UploadError, match=message):
            stage_upload(files, tmp_path / "d")


# --------------------------------------------------------------------------------------------
# browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"recokd serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


def _zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"S3/{path.name}")
    return out


class _Page:
    """The page and its view, with the checks every step makes."""

    VIEWPORT = {"width": 1400, "height": 900}

    def __init__(self, page, shots: Path):
        self.page, self.shots, self.count = page, shots, 0
        self.view = page.locator("img.image-display-area").first

    def digest(self) -> str:
        """Hash of the rendered frame's own pixels (not of the screen: the error alert lies over the view)."""
        data = self.page.evaluate("""() => { const i = document.querySelector('img.image-display-area');
            const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
            c.getContext('2d').drawImage(i, 0, 0); return c.toDataURL('image/png'); }""")
        return hashlib.sha256(data.encode()).hexdigest()

    def changed(self, name: str, previous: str | None) -> str:
        """Wait until the view differs from ``previous`` and settles; save and hash the frame."""
        digest, deadline = previous, time.monotonic() + 45
        while digest == previous and time.monotonic() < deadline:
            self.page.wait_for_timeout(300)
            digest = self.digest()
        stable = 0  # then until three frames 400 ms apart agree (the view may still be refitting; on a
        while stable < 2 and time.monotonic() < deadline:  # loaded machine two agreeing frames were not enough)
            self.page.wait_for_timeout(400)
            now = self.digest()
            stable = stable + 1 if now == digest else 0
            digest = now
        self.save(name)
        assert digest != previous, f"the view did not change after: {name}"
        return digest

    def unchanged(self, name: str, expected: str) -> None:
        self.page.wait_for_timeout(800)
        self.save(name)
        assert self.digest() == expected, f"the last good view was not kept after: {name}"

    def save(self, name: str) -> None:
        self.count += 1
        self.page.screenshot(path=str(self.shots / f"{self.count:02d}_{name}.png"))

    def error_in_view(self, *expected: str) -> str:
        """The error alert's text, after checking it sits at the top of the view area, fully on screen."""
        from playwright.sync_api import expect

        alert = self.page.locator("#error")
        for part in expected:  # the alert may still show the previous error until the new one arrives
            expect(alert).to_contain_text(part, timeout=90_000)
        text = alert.inner_text()
        box, view_box = alert.bounding_box(), self.view.bounding_box()
        drawer = self.page.locator(".v-navigation-drawer").first.bounding_box()
        assert box["y"] >= 0 and box["y"] + box["height"] <= self.VIEWPORT["height"], box
        assert box["y"] < view_box["y"] + 60, (box, view_box)  # at the top of the view, not below it
        assert box["x"] >= drawer["x"] + drawer["width"] - 1, (box, drawer)  # over the view, not in the drawer
        return text

    def error_gone(self) -> None:
        self.page.locator("#error").wait_for(state="detached")

    def choose(self, select_id: str, option_text: str) -> None:
        self.page.locator(f".v-field:has(#{select_id})").click()
        self.page.get_by_role("option").filter(has_text=option_text).first.click()

    def options(self, select_id: str) -> list[str]:
        """The option texts of a select (its menu opened, read, closed)."""
        self.page.locator(f".v-field:has(#{select_id})").click()
        self.page.get_by_role("option").first.wait_for()
        texts = [t.strip() for t in self.page.get_by_role("option").all_inner_texts()]
        self.page.keyboard.press("Escape")
        self.page.get_by_role("option").first.wait_for(state="detached")
        return texts

    def slider_to(self, slider_id: str, key: str) -> None:
        thumb = self.page.locator(f"#{slider_id}").locator("xpath=..").locator(".v-slider-thumb").first
        thumb.focus()
        self.page.keyboard.press(key)

    def upload(self, *paths: Path) -> None:
        self.page.locator("input[type=file]").first.set_input_files([str(p) for p in paths])


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_browser_session_as_a_clinic_uses_it(tmp_path, tiny_ct_case, s3_dicom_folder):
    sync_api = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("trame_slicer")
    highdicom = pytest.importorskip("highdicom")
    runs = tmp_path / "runs"
    teacher = _save_model(runs / "teacher" / "model_last.pt")
    student = _distilled_student(runs / "distilled" / "model_last.pt", teacher)
    brain = _save_model(runs / "brain" / "model_last.pt", reduction=2, seed=2, role="student",
                        classes=["background", "brain"])
    two_channels = _save_model(runs / "t1_t2" / "model_last.pt", seed=3, in_channels=2)
    started = time.monotonic()

    def lap(what: str) -> None:
        print(f"  {time.monotonic() - started:6.1f} s  {what}")

    shots = Path(os.environ.get("RECOKD_SCREENSHOT_DIR") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nrecokd serve screenshots: {shots}")
    port = _free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow"}
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "ReCoKDLib", "serve", "--port", str(port), "--model", str(runs), "--device", "cpu"],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_for_http(f"http://127.0.0.1:{port}/index.html", server, log)
        lap("server answers /index.html")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page(viewport=_Page.VIEWPORT, accept_downloads=True)
                page.set_default_timeout(90_000)
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_function("() => { const i = document.querySelector('img.image-display-area');"
                                       " return i && i.complete && i.naturalWidth > 0; }")
                ui = _Page(page, shots)
                lap("first remote-rendered frame")
                empty = ui.digest()

                # 1. the pickers title models from their cards: the two model_last.pt are told apart
                options = ui.options("model")
                assert any(o.startswith("teacher · liver, spleen") and o.endswith("teacher/model_last.pt")
                           for o in options), options
                assert any("distilled from teacher/model_last.pt — distilled/model_last.pt" in o for o in options)

                # 2. a wrong file: the error shows over the view, which stays empty
                bad = tmp_path / "not_an_image.nii.gz"
                bad.write_bytes(b"garbage")
                ui.upload(bad)
                ui.error_in_view("Could not load not_an_image.nii.gz")
                ui.unchanged("bad_upload_first", empty)

                ui.upload(tiny_ct_case.image_paths[0])
                page.get_by_text("Loaded tiny_s1_0000.nii.gz").wait_for()
                ui.error_gone()
                loaded = ui.changed("loaded", empty)
                lap("CT uploaded and shown")
                ui.upload(bad)  # a failed load keeps the volume that was shown
                ui.error_in_view("Could not load not_an_image.nii.gz")
                ui.unchanged("bad_upload_keeps_the_volume", loaded)

                # 3. window/level presets change the view
                ui.choose("window_preset", "CT bone")
                windowed = ui.changed("window_bone", loaded)
                ui.choose("window_preset", "CT abdomen")
                loaded = ui.changed("window_abdomen", windowed)

                # 4. a model that cannot segment this image: the reason over the view, the view kept
                ui.choose("model", "t1_t2/model_last.pt")
                page.locator("#segment").click()
                ui.error_in_view("Segmentation failed", "channel")
                ui.unchanged("failed_segment_keeps_the_view", loaded)

                ui.choose("model", "— teacher/model_last.pt")
                page.locator("#segment").click()
                page.get_by_text("Segmented in").wait_for()
                segmented = ui.changed("segmented", loaded)
                page.locator("#segment").click()  # a second Segment replaces the first cleanly
                page.get_by_text("Segmented in").wait_for()
                lap("segmented twice")

                ui.slider_to("fill_opacity", "End")
                page.get_by_text("Segment fill 1").wait_for()
                filled = ui.changed("fill_opacity_1", segmented)
                ui.slider_to("fill_opacity", "Home")
                page.get_by_text("Segment fill 0").wait_for()
                unfilled = ui.changed("fill_opacity_0", filled)

                # 5. Inspect asks for both models; a pair of other classes is refused at once and on Show map
                assert page.locator("#inspect").is_disabled()
                ui.choose("teacher", "teacher/model_last.pt")
                ui.choose("student", "brain/model_last.pt")
                page.locator("#pair_problem").wait_for()
                assert "different classes" in page.locator("#pair_problem").inner_text()
                page.locator("#inspect").click()
                ui.error_in_view("Inspection failed", "different classes")
                ui.choose("student", "distilled/model_last.pt")
                page.locator("#inspect").click()
                page.get_by_text("Showing difference at level 0").wait_for()
                ui.error_gone()
                overlay = ui.changed("difference_overlay", unfilled)
                lap("difference overlay shown")
                levels = ui.options("level")
                assert levels[0] == "0" and len(levels) >= 2 and levels == sorted(set(levels)), levels
                ui.choose("level", levels[-1])  # only levels the maps have are offered
                page.locator("#inspect").click()
                page.get_by_text(f"Showing difference at level {levels[-1]}").wait_for()
                overlay = ui.changed(f"difference_level_{levels[-1]}", overlay)
                ui.slider_to("threshold", "End")  # weak values transparent: the CT shows through
                page.get_by_text("Hide values below 95 %").wait_for()
                overlay = ui.changed("threshold_95", overlay)
                ui.choose("student", "brain/model_last.pt")  # a failed Inspect keeps the overlay shown
                page.locator("#inspect").click()
                ui.error_in_view("Inspection failed", "different classes")
                ui.unchanged("failed_inspect_keeps_the_overlay", overlay)
                page.screenshot(path=str(shots / "readme_recokd_serve.png"))

                with page.expect_download() as download_info:
                    page.locator("#download").click()
                saved = tmp_path / "segmentation.seg.nrrd"
                download_info.value.save_as(saved)
                assert saved.read_bytes().startswith(b"NRRD") and b"Segment0_Name" in saved.read_bytes()
                lap("segmentation downloaded")

                # 6. DICOM: the real S3 series as a zip, segmented, back as a DICOM SEG
                assert page.locator("#download_dicom").is_disabled()  # a NIfTI has no series to reference
                ui.upload(_zip_folder(s3_dicom_folder, tmp_path / "S3.zip"))
                page.get_by_text("(DICOM series): 20x512x512 voxels").wait_for()
                ui.choose("model", "— teacher/model_last.pt")
                page.locator("#segment").click()
                page.get_by_text("Segmented in").wait_for()
                ui.save("dicom_segmented")
                with page.expect_download() as download_info:
                    page.locator("#download_dicom").click()
                dicom_seg = tmp_path / "segmentation.dcm"
                download_info.value.save_as(dicom_seg)
                page.get_by_text("DICOM SEG with").wait_for()
                lap("DICOM series uploaded, segmented, DICOM SEG downloaded")
            finally:
                browser.close()
        assert server.poll() is None, "the server must survive the whole session"
    finally:
        _stop(server)
    server_log = log.read_text()
    assert "inconsistency" not in server_log, server_log[-3000:]

    # the page's DICOM SEG holds what `recokd segment` computes on the same series
    from test_dicom_seg import _on_grid

    from ReCoKDLib.data.io import read_image

    cli_out = tmp_path / "cli_s3.nii.gz"
    result = subprocess.run([sys.executable, "-m", "ReCoKDLib", "segment", str(teacher), str(s3_dicom_folder),
                             str(cli_out), "--device", "cpu", "--progress", "none"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # one thread, as served
    assert result.returncode == 0, result.stderr
    labels, geometry = read_image(cli_out)
    seg = highdicom.seg.segread(dicom_seg)
    combined = _on_grid(seg.get_volume(combine_segments=True), geometry, labels.shape)
    as_classes = np.zeros_like(labels)
    for item in seg.SegmentSequence:
        as_classes[combined == int(item.SegmentNumber)] = CLASSES.index(item.SegmentLabel)
    np.testing.assert_array_equal(as_classes, labels)
