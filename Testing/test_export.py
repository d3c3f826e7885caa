"""Export: TorchScript and ONNX with ONNX Runtime parity, and the exported model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ReCoKDLib.checkpoint import ModelCard, save_model, sha256_file
from ReCoKDLib.export import ExportError, export_model
from ReCoKDLib.networks import build_unet, preset
from ReCoKDLib.teachers import load_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("export")
    config = preset("tiny", num_classes=3)
    card = ModelCard(architecture={"kind": "dynunet", "config": config.to_dict()}, classes=["bg", "a", "b"],
                     spacing=[2.0, 1.5, 1.5], normalization={"scheme": "zscore"}, patch_size=[16, 16, 16],
                     role="student", metrics={"mean_dice": 0.5}, kd={"method": "recokd", "weight": 1.0})
    net = build_unet(config).eval()
    model_path = save_model(root / "student.pt", net.state_dict(), card)
    teacher_path = save_model(root / "teacher.pt", net.state_dict(), card)
    files = export_model(model_path, root / "out", teacher_path=teacher_path)
    return net, model_path, teacher_path, files


def test_onnx_runtime_parity(exported):
    import onnxruntime

    net, _, _, files = exported
    session = onnxruntime.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    for shape in [(1, 1, 16, 16, 16), (2, 1, 32, 16, 48)]:  # dynamic batch and spatial sizes
        x = torch.randn(shape)
        ours = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            reference = net(x).numpy()
        assert ours.shape == reference.shape
        np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


def test_torchscript_loads_and_matches(exported):
    net, _, _, files = exported
    scripted = torch.jit.load(str(files["torchscript"]))
    x = torch.randn(1, 1, 16, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), atol=1e-5, rtol=1e-5)
    model = load_model(files["torchscript"])  # the card beside it is found
    assert model.kind == "torchscript" and model.card.classes == ["bg", "a", "b"]


def test_card_records_hashes_versions_and_kd(exported):
    _, model_path, teacher_path, files = exported
    card = json.loads(files["card"].read_text())
    record = card["provenance"]["export"]
    assert card["classes"] == ["bg", "a", "b"] and card["spacing"] == [2.0, 1.5, 1.5]
    assert card["normalization"] == {"scheme": "zscore"} and card["metrics"] == {"mean_dice": 0.5}
    assert card["kd"] == {"method": "recokd", "weight": 1.0}
    assert record["student_sha256"] == sha256_file(model_path)
    assert record["teacher_sha256"] == sha256_file(teacher_path)
    assert record["files"][files["onnx"].name]["sha256"] == sha256_file(files["onnx"])
    assert record["library_versions"]["torch"] == torch.__version__
    assert record["onnx_max_abs_diff"] < 1e-4 and record["spatial_multiple"] == [16, 16, 16]


def test_unknown_format(exported, tmp_path):
    _, model_path, _, _ = exported
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(model_path, tmp_path, formats=("tflite",))


def test_cli_export(exported, tmp_path, capsys):
    from ReCoKDLib.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0 and "--format" in capsys.readouterr().out
    _, model_path, _, _ = exported
    assert main(["export", str(model_path), "--out", str(tmp_path), "--format", "torchscript", "--progress", "none"]) == 0
    assert (tmp_path / "student.ts").is_file() and (tmp_path / "student.json").is_file()
    assert not (tmp_path / "student.onnx").exists()
    assert "torchscript" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path), "--progress", "none"]) == 2
    assert "does not exist" in capsys.readouterr().err
