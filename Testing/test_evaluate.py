"""Evaluation: Dice/HD95 conventions, metrics.json, the self-contained HTML report, the CLI."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

from ReCoKDLib.checkpoint import ModelCard, save_model
from ReCoKDLib.cli import main
from ReCoKDLib.data.io import Geometry, write_image
from ReCoKDLib.data.layout import Case
from ReCoKDLib.evaluate import EvaluationError, dice_hd95, evaluate_models, load_loss_curves
from ReCoKDLib.models.backends import cpu_supports_bf16
from ReCoKDLib.networks import build_unet, preset

CLASSES = ["background", "liver", "spleen"]


def test_dice_hd95_values_and_empty_classes():
    pred = np.zeros((10, 12, 14), np.uint8)
    ref = pred.copy()
    pred[2:6, 2:6, 2:6] = 1
    ref[2:6, 2:6, 3:7] = 1  # shifted by one voxel along W
    pred[7:9, 7:9, 7:9] = 2  # class 2 predicted but absent from the reference; class 3 absent from both
    dice, hd = dice_hd95(pred, ref, 4, spacing=(2.0, 1.0, 3.0))
    assert dice == pytest.approx([0.75, 0.0, 1.0])  # 2 * 48 / (64 + 64)
    assert hd[0] == pytest.approx(3.0) and hd[1] is None and hd[2] == 0.0  # one W voxel = 3 mm
    with pytest.raises(EvaluationError, match="same grid|one grid"):
        dice_hd95(pred, ref[:-1], 4)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    config = preset("tiny", num_classes=3)
    card = ModelCard(architecture={"kind": "dynunet", "config": config.to_dict()}, classes=CLASSES,
                     spacing=[3.0, 2.0, 2.0], normalization={"scheme": "zscore"}, patch_size=[16, 16, 16])
    models = {name: save_model(root / f"{name}.pt", build_unet(config).state_dict(), card) for name in ("teacher", "student")}
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (16, 24, 24)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[4:10, 6:16, 6:14] = 1
    label[10:13, 12:18, 14:20] = 2
    geometry = Geometry((2.0, 2.0, 3.0), (5.0, -3.0, 7.0))
    image_path = write_image(image, geometry, root / "case_0000.nii.gz")
    label_path = write_image(label, geometry, root / "case.nii.gz")
    log = root / "log.jsonl"
    log.write_text("\n".join(json.dumps({"v": 1, "event": "progress", "stage": "distill", "step": s,
                                         "losses": {"total": 2.0 / s, "kd": 0.5 / s}}) for s in range(1, 6)) + "\n")
    return root, models, Case("case", [image_path], label_path), log


def _pngs(html_text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)]


def test_evaluate_models_writes_metrics_and_report(tiny_setup, tmp_path):
    _, models, case, log = tiny_setup
    events = []
    from ReCoKDLib.progress import Reporter

    metrics = evaluate_models(models, [case], tmp_path, device="cpu", latency_repeats=1,
                              training_logs={"student": log}, reporter=Reporter(events.append))
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics)) and set(on_disk) == {"teacher", "student"}
    for entry in on_disk.values():
        assert set(entry["dice"]) == {"liver", "spleen"} and set(entry["hd95"]) == {"liver", "spleen"}
        assert all(0.0 <= v <= 1.0 for v in entry["dice"].values())
        assert entry["mean_dice"] == pytest.approx(np.mean(list(entry["dice"].values())))
        assert entry["params"] > 1000 and entry["flops"] > 0 and entry["latency_s"] > 0
        # bf16 latency only where oneDNN has bf16 kernels (an AVX2-only CPU, as CI may be, reports none)
        assert entry["latency_bf16_s"] > 0 if cpu_supports_bf16() else entry["latency_bf16_s"] is None
        assert entry["cases"]["case"]["dice"] == entry["dice"]
    html_text = (tmp_path / "report.html").read_text()
    images = _pngs(html_text)
    assert len(images) == 3  # loss curves + one overlay per model
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000 for png in images)
    assert len(list((tmp_path / "figures").glob("*.png"))) == 3
    assert "teacher" in html_text and "spleen" in html_text
    assert [e["event"] for e in events][-1] == "done"


def test_loss_curves_and_bad_input(tiny_setup, tmp_path):
    _, models, case, log = tiny_setup
    curves = load_loss_curves(log)
    assert curves["total"][0] == [1.0, 2.0, 3.0, 4.0, 5.0] and curves["kd"][1][-1] == pytest.approx(0.1)
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"history": [{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.5}]}))
    assert load_loss_curves(history) == {"train_loss": ([0.0, 1.0], [1.0, 0.5])}
    with pytest.raises(EvaluationError, match="no model"):
        evaluate_models({}, [case], tmp_path)
    with pytest.raises(EvaluationError, match="no test case"):
        evaluate_models(models, [], tmp_path)
    with pytest.raises(EvaluationError, match="has no label"):
        evaluate_models(models, [Case("x", case.image_paths, None)], tmp_path)


def test_cli_evaluate(tiny_setup, tmp_path, capsys):
    _, models, case, _ = tiny_setup
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0 and "--model NAME=PATH" in capsys.readouterr().out
    out = tmp_path / "cli"
    code = main(["evaluate", "--model", f"student={models['student']}", "--pairs",
                 f"{case.image_paths[0]}:{case.label_path}", "--out", str(out), "--device", "cpu",
                 "--latency-repeats", "0", "--progress", "none"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["student"] and metrics["student"]["latency_s"] is None
    assert metrics["student"]["latency_bf16_s"] is None
    assert "student" in capsys.readouterr().out
    assert main(["evaluate", "--model", "student=/no/such.pt", "--pairs", "a:b", "--out", str(out), "--progress", "none"]) == 2
    assert "no such file" in capsys.readouterr().err
