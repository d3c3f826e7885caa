"""``recokd serve`` end to end in a real browser, and its model catalogue.

The browser test starts ``recokd serve`` in a subprocess on a free loopback port with a tiny real
model, drives Debian's Chromium through Playwright (never a downloaded browser), uploads a crop of
the real CT, clicks Segment, moves the fill-opacity slider, shows an inspection overlay and
downloads the ``.seg.nrrd``; the rendered view must change at each step. Screenshots are saved
under pytest's tmp dir (the path is printed). The server is stopped by its PID.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


# --------------------------------------------------------------------------------------------
# catalogue (no server)


def test_catalogue_lists_files_folders_and_presets(tmp_path):
    from ReCoKDLib.web.catalogue import CatalogueError, find_models

    models = tmp_path / "models"
    teacher = _save_model(models / "teacher.pt")
    student = _save_model(models / "run" / "model_last.pt", reduction=2, role="student")
    (models / "run" / "checkpoint.pt").write_bytes(b"training state, not a model")
    (models / "notes.pt").write_bytes(b"no card beside it")
    found = find_models([models, teacher], presets=False)
    assert [c.source for c in found] == [str(teacher), str(student)]  # duplicates dropped, order kept
    assert [c.kind for c in found] == ["file", "file"]
    assert found[1].as_item() == {"title": "run/model_last.pt", "value": str(student)}
    assert [c.source for c in find_models(["preset:hd-bet"], presets=False)] == ["preset:hd-bet"]
    if importlib.util.find_spec("ReCoKDLib.nnunet") is not None:
        from test_scene_logic import fake_nnunet_folder

        folder = fake_nnunet_folder(tmp_path / "nnunet_results")
        for given in (folder, tmp_path / "nnunet_results"):  # the folder itself, or a folder above it
            (choice,) = find_models([given], presets=False)
            assert (choice.source, choice.kind) == (str(folder), "nnunet")
    from ReCoKDLib.mrml.logic import available_presets

    assert [c.source for c in find_models([], presets=True)] == [f"preset:{n}" for n in available_presets()]
    with pytest.raises(CatalogueError, match="does not exist"):
        find_models([tmp_path / "missing.pt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogueError, match="holds no model"):
        find_models([tmp_path / "empty"])


def test_serve_refuses_a_missing_model_with_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ReCoKDLib", "serve", "--model", str(tmp_path / "nope.pt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr


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


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_browser_upload_segment_slider_inspect_download(tmp_path, tiny_ct_case):
    sync_api = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("trame_slicer")
    teacher = _save_model(tmp_path / "models" / "teacher.pt")
    student = _save_model(tmp_path / "models" / "student.pt", reduction=2, seed=1, role="student")
    brain = _save_model(tmp_path / "models" / "brain.pt", reduction=2, seed=2, role="student",
                        classes=["background", "brain"])
    started = time.monotonic()

    def lap(what: str) -> None:
        print(f"  {time.monotonic() - started:6.1f} s  {what}")

    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"\nrecokd serve screenshots: {shots}")
    port = _free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow"}
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "ReCoKDLib", "serve", "--port", str(port), "--model", str(teacher),
             "--model", str(student), "--model", str(brain), "--device", "cpu"],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_for_http(f"http://127.0.0.1:{port}/index.html", server, log)
        lap("server answers /index.html")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/")
                view = page.locator("img.image-display-area").first
                page.wait_for_function("() => { const i = document.querySelector('img.image-display-area');"
                                       " return i && i.complete && i.naturalWidth > 0; }")
                shots_taken: list[str] = []

                def snapshot(name: str, previous: str | None) -> str:
                    """Wait until the view differs from ``previous``; save and hash the frame."""
                    digest, deadline = previous, time.monotonic() + 30
                    while digest == previous and time.monotonic() < deadline:
                        page.wait_for_timeout(300)
                        digest = hashlib.sha256(view.screenshot()).hexdigest()
                    settled = None  # then until two frames agree (the view may still be refitting)
                    while settled != digest and time.monotonic() < deadline:
                        settled = digest
                        page.wait_for_timeout(400)
                        digest = hashlib.sha256(view.screenshot()).hexdigest()
                    view.screenshot(path=str(shots / f"{len(shots_taken)}_{name}.png"))
                    shots_taken.append(name)
                    assert digest != previous, f"the view did not change after: {name}"
                    return digest

                lap("first remote-rendered frame")
                empty = hashlib.sha256(view.screenshot()).hexdigest()
                # bad input first: a wrong file shows an error in the page and the server goes on
                bad = tmp_path / "not_an_image.nii.gz"
                bad.write_bytes(b"garbage")
                page.locator("input[type=file]").first.set_input_files(str(bad))
                page.locator("#error").wait_for()
                assert "Could not load not_an_image.nii.gz" in page.locator("#error").inner_text()

                page.locator("input[type=file]").first.set_input_files(str(tiny_ct_case.image_paths[0]))
                page.get_by_text("Loaded tiny_s1_0000.nii.gz").wait_for()
                loaded = snapshot("loaded", empty)
                lap("CT uploaded and shown")

                page.locator("#segment").click()
                page.get_by_text("Segmented in").wait_for()
                assert "#error" not in page.content() or not page.locator("#error").is_visible()
                segmented = snapshot("segmented", loaded)
                lap("segmented")

                thumb = page.locator("#fill_opacity").locator("xpath=..").locator(".v-slider-thumb").first
                thumb.focus()
                page.keyboard.press("End")  # fill opacity -> 1
                page.get_by_text("Segment fill 1").wait_for()
                filled = snapshot("fill_opacity_1", segmented)
                lap("fill opacity slider moved")

                # a student of other classes: a clear message, nothing shown, the server goes on
                page.locator(".v-field:has(#student)").click()
                page.get_by_role("option", name="brain.pt").click()
                page.locator("#inspect").click()
                page.locator("#error").wait_for()
                assert "different classes" in page.locator("#error").inner_text()
                page.locator(".v-field:has(#student)").click()
                page.get_by_role("option", name="student.pt").click()
                thumb.focus()
                page.keyboard.press("Home")  # fill opacity -> 0: the overlay shows under the outlines
                page.get_by_text("Segment fill 0").wait_for()
                unfilled = snapshot("fill_opacity_0", filled)

                page.locator("#inspect").click()
                page.get_by_text("Showing difference at level 0").wait_for()
                snapshot("difference_overlay", unfilled)
                lap("difference overlay shown")

                with page.expect_download() as download_info:
                    page.locator("#download").click()
                saved = tmp_path / "segmentation.seg.nrrd"
                download_info.value.save_as(saved)
                assert saved.read_bytes().startswith(b"NRRD") and b"Segment0_Name" in saved.read_bytes()
                lap("segmentation downloaded")
            finally:
                browser.close()
        assert server.poll() is None, "the server must survive the whole session"
    finally:
        _stop(server)
