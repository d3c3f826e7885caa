"""The inference backend layer: every backend agrees with PyTorch, exact geometry, the graph cache,
refusals and fallbacks; the window and the fast restore; the oneDNN convolution of thin layers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from torch import nn

from ReCoKDLib.checkpoint import ModelCard, save_model
from ReCoKDLib.data.io import Geometry
from ReCoKDLib.data.preprocess import preprocess_case, restore_to_original
from ReCoKDLib.infer import segment_volume
from ReCoKDLib.models import backends, runtimes
from ReCoKDLib.models.base import InferenceError
from ReCoKDLib.models.runtimes import GraphNetwork, export_onnx
from ReCoKDLib.models.loading import load_model
from ReCoKDLib.models.window import choose_window
from ReCoKDLib.networks import OneDNNConv3d, build_unet, derive_student_config, plain_convolutions, preset
from ReCoKDLib.restore import restore_labels

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


def _geometry(spacing=(1.3, 1.1, 2.2), angle=0.3) -> Geometry:
    c, s = np.cos(angle), np.sin(angle)
    return Geometry(spacing, (2.0, -3.0, 5.0), tuple(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).ravel()))


def _save(folder, name="tiny.pt", seed=0, classes=("bg", "a", "b"), **overrides):
    torch.manual_seed(seed)
    config = preset("tiny", num_classes=len(classes), **overrides)
    network = build_unet(config)
    with torch.no_grad():  # larger logits than at initialisation: classes are decided, not tied
        for p in network.parameters():
            p.mul_(3.0)
    card = ModelCard(architecture={"kind": "dynunet", "config": config.to_dict()}, classes=list(classes),
                     spacing=[2.0, 1.5, 1.5], normalization={"scheme": "zscore"}, patch_size=[16, 16, 16])
    return save_model(folder / name, network.state_dict(), card)


@pytest.fixture
def volume():
    rng = np.random.default_rng(3)
    image = rng.normal(0, 1, (30, 40, 36)).astype(np.float32)
    image[8:20, 10:30, 10:25] += 3.0
    return image, _geometry()


@pytest.fixture(autouse=True)
def _user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOKD_CACHE_DIR", str(tmp_path / "user-cache"))


@pytest.mark.parametrize("backend,precision", [("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32")])
def test_every_fp32_backend_agrees_with_pytorch_on_the_exact_grid(tmp_path, volume, backend, precision):
    image, geometry = volume
    path = _save(tmp_path)
    reference = segment_volume(load_model(path), image, geometry, device="cpu", backend="torch", precision="fp32",
                               window="patch", return_probabilities=True)
    result = segment_volume(load_model(path), image, geometry, device="cpu", backend=backend, precision=precision,
                            window="patch", return_probabilities=True)
    assert result.info["backend"]["backend"] == backend and result.info["backend"]["precision"] == precision
    assert result.labels.shape == image.shape and result.geometry == geometry
    np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=2e-4)
    assert np.mean(result.labels == reference.labels) > 0.999
    if backend != "torch":
        check = [c for c in result.info["backend"]["checks"] if c["backend"] == backend][0]
        assert check["status"] == "ok" and check["max_abs_diff"] < 1e-3


def test_graph_backends_aggregate_windows_on_one_torch_thread(tmp_path, volume, monkeypatch):
    """With ONNX Runtime or OpenVINO computing the windows, PyTorch only aggregates them: one thread,
    so that no OpenMP worker spins on the runtime's cores; the count is restored afterwards (also
    after an error), and the PyTorch backend keeps its threads."""
    import ReCoKDLib.infer as infer

    image, geometry = volume
    path = _save(tmp_path)
    seen = []
    real = infer.predict_logits

    def recording(network, *args, **kwargs):
        seen.append((type(network).__name__, torch.get_num_threads(), getattr(network, "threads", None)))
        return real(network, *args, **kwargs)

    monkeypatch.setattr(infer, "predict_logits", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for backend in ("torch", "onnxruntime", "openvino"):
            segment_volume(load_model(path), image, geometry, device="cpu", backend=backend, precision="fp32",
                           window="patch")
            assert torch.get_num_threads() == 2
        assert seen[0][:2] == ("TorchNetwork", 2)
        assert [s[:2] for s in seen[1:]] == [("GraphNetwork", 1)] * 2
        assert [s[2] for s in seen[1:]] == [2, 2]  # the runtime keeps the threads it was built with
        with pytest.raises(RuntimeError, match="boom"), runtimes.torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_nnunet_sliding_window_with_graph_networks_aggregates_on_one_thread(tmp_path, monkeypatch):
    """nnU-Net's own sliding window (``nnunet.predict``) does the same with a backend's graphs."""
    from ReCoKDLib.nnunet import predict

    network = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1)).eval()
    graph = GraphNetwork(export_onnx(network, torch.zeros(1, 1, 8, 8, 8), tmp_path / "g.onnx", dynamic_axes=True),
                         "onnxruntime", threads=2)
    seen = []
    real = predict._one_network
    monkeypatch.setattr(predict, "_one_network", lambda net, *a, **k: (seen.append(torch.get_num_threads()),
                                                                       real(net, *a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data = torch.randn(1, 12, 10, 9)
        with torch.no_grad():
            expected = predict.sliding_window_logits(network, data, (8, 8, 8)).float()
            got = predict.sliding_window_logits(graph, data, (8, 8, 8)).float()
        assert seen == [2, 1] and torch.get_num_threads() == 2
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)  # fp16 sums, as nnU-Net's
        assert isinstance(runtimes.aggregate_on_one_thread([graph, network]), contextlib.nullcontext)
        assert isinstance(runtimes.aggregate_on_one_thread([]), contextlib.nullcontext)
    finally:
        torch.set_num_threads(before)


def test_bf16_backends_keep_the_classes(tmp_path, volume):
    if not backends.cpu_supports_bf16():
        pytest.skip("no bf16 instructions on this CPU")
    image, geometry = volume
    path = _save(tmp_path)
    reference = segment_volume(load_model(path), image, geometry, device="cpu", backend="torch", precision="fp32")
    for backend in ("torch", "openvino"):
        try:
            result = segment_volume(load_model(path), image, geometry, device="cpu", backend=backend, precision="bf16")
        except InferenceError as exc:  # random weights: near-tied classes may flip under bf16; then it says so
            assert f"backend {backend} bf16 disagrees with PyTorch fp32" in str(exc) and "keep their class" in str(exc)
            continue
        check = [c for c in result.info["backend"]["checks"] if c["precision"] == "bf16"][0]
        assert result.info["backend"]["precision"] == "bf16" and check["agreement"] >= backends.BF16_MIN_AGREEMENT
        assert np.mean(result.labels == reference.labels) > 0.97


def test_auto_measures_once_remembers_and_logs_why(tmp_path, volume):
    image, geometry = volume
    path = _save(tmp_path)
    lines = []
    runner = backends.prepare_runner(load_model(path), log=lines.append)
    assert runner.backend in ("torch", "onnxruntime", "openvino")
    measured = {(c["backend"], c["precision"]) for c in runner.checks}
    assert {("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32")} <= measured
    assert "fastest" in runner.reason and any(line.startswith("backend: ") for line in lines)
    record = json.loads(next((tmp_path / ".recokd-cache").glob("*.json")).read_text())
    assert record["model_sha256"] and list(record["choices"].values())[0]["choice"] == f"{runner.backend} {runner.precision}"
    again = backends.prepare_runner(load_model(path))  # a new process would do the same: no probe runs
    assert "remembered" in again.reason and (again.backend, again.precision) == (runner.backend, runner.precision)
    result = segment_volume(load_model(path), image, geometry, device="cpu")
    assert result.info["backend"]["backend"] == runner.backend


def test_the_probe_counts_the_fastest_of_several_calls(tmp_path):
    """One timed call is at the mercy of the machine: the fastest of several counts, and a choice
    remembered from a single timed call (before PROBE_TIMING existed) is made again."""
    import time

    calls = []

    class Jittery(torch.nn.Module):
        def forward(self, x):
            calls.append(x)
            if len(calls) == 2:  # the first timed call: another program had the cores
                time.sleep(0.3)
            return x

    _, seconds = backends._time_probe(Jittery(), torch.zeros(1, 1, 2, 2, 2))
    assert len(calls) == 1 + backends.PROBE_REPEATS and seconds < 0.1
    path = _save(tmp_path)
    backends.prepare_runner(load_model(path))
    record_path = next((tmp_path / ".recokd-cache").glob("*.json"))
    record = json.loads(record_path.read_text())
    (choice,) = record["choices"].values()
    assert choice["timing"] == backends.PROBE_TIMING
    del choice["timing"]
    record_path.write_text(json.dumps(record))
    again = backends.prepare_runner(load_model(path))
    assert "remembered" not in again.reason and "fastest" in again.reason
    assert list(json.loads(record_path.read_text())["choices"].values())[0]["timing"] == backends.PROBE_TIMING


def test_pytorch_fp32_asked_for_runs_no_probe(tmp_path, volume, monkeypatch):
    # the reference needs no check against itself: its first segmentation costs no extra passes
    # (a fully convolutional student's probe is the whole scan: two passes were 9 s of a 17 s first call)
    def no_probe(*_args, **_kwargs):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(backends, "_time_probe", no_probe)
    image, geometry = volume
    path = _save(tmp_path)
    runner = backends.prepare_runner(load_model(path), backend="torch", precision="fp32")
    assert (runner.backend, runner.precision, runner.checks) == ("torch", "fp32", [])
    assert runner.reason == "torch fp32: as asked"
    result = segment_volume(load_model(path), image, geometry, device="cpu", backend="torch", precision="fp32")
    assert result.labels.shape == image.shape and not list(tmp_path.glob(".recokd-cache/*"))


def test_logits_of_the_wrong_size_are_a_clear_error(tmp_path, volume, monkeypatch):
    # a backend whose output does not follow the window (as exported strided-stem graphs did with a
    # remembered choice and a new window) is named, not a numpy broadcasting error
    real = backends.TorchNetwork.forward
    monkeypatch.setattr(backends.TorchNetwork, "forward", lambda self, x: real(self, x)[..., ::2, ::2, ::2])
    image, geometry = volume
    with pytest.raises(InferenceError, match=r"torch fp32 backend gave logits of size \(\d+, \d+, \d+\) for a"):
        segment_volume(load_model(_save(tmp_path)), image, geometry, device="cpu", backend="torch", precision="fp32")


def test_a_graph_dropped_into_the_cache_is_never_loaded(tmp_path):
    path = _save(tmp_path)
    backends.prepare_runner(load_model(path), "onnxruntime", "fp32")
    cache = tmp_path / ".recokd-cache"
    graph = next(cache.glob("*.onnx"))
    # someone replaces the graph by another network's (same shapes, other weights)
    other = _save(tmp_path / "other", seed=1) if (tmp_path / "other").mkdir() is None else None
    backends.prepare_runner(load_model(other), "onnxruntime", "fp32")
    foreign = next((tmp_path / "other" / ".recokd-cache").glob("*.onnx"))
    shutil.copy(foreign, graph)
    lines = []
    runner = backends.prepare_runner(load_model(path), "onnxruntime", "fp32", log=lines.append)
    assert any("ignored" in line and graph.name in line for line in lines)
    assert runner.checks[-1]["status"] == "ok" and runner.checks[-1]["max_abs_diff"] < 1e-3  # exported again
    record = json.loads(next(cache.glob("*.json")).read_text())
    from ReCoKDLib.checkpoint import sha256_file

    assert record["graphs"]["0"]["sha256"] == sha256_file(graph) != sha256_file(foreign)


def test_the_cache_key_is_the_model_files_hash(tmp_path):
    path = _save(tmp_path)
    backends.prepare_runner(load_model(path), "onnxruntime", "fp32")
    first = sorted(p.name for p in (tmp_path / ".recokd-cache").iterdir())
    _save(tmp_path, seed=5)  # the same file name, other weights: another key, another graph
    backends.prepare_runner(load_model(path), "onnxruntime", "fp32")
    names = sorted(p.name for p in (tmp_path / ".recokd-cache").iterdir())
    assert len(names) == 2 * len(first) and set(first) < set(names)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_model_folder_caches_in_the_user_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = _save(folder)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        runner = backends.prepare_runner(load_model(path), "onnxruntime", "fp32")
    finally:
        folder.chmod(stat.S_IRWXU)
    assert runner.graphs and str(tmp_path / "user-cache") in runner.graphs[0]


def test_unwritable_model_folder_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    """As root cannot be kept out of a folder, the access check is what decides."""
    path = _save(tmp_path)
    real = os.access
    monkeypatch.setattr(backends.os, "access", lambda p, mode: False if str(p).endswith(".recokd-cache") else real(p, mode))
    runner = backends.prepare_runner(load_model(path), "onnxruntime", "fp32")
    assert runner.graphs and runner.graphs[0].startswith(str(tmp_path / "user-cache"))


def test_missing_runtime_is_an_error_when_asked_and_skipped_by_auto(tmp_path, monkeypatch):
    path = _save(tmp_path)
    monkeypatch.setattr(backends, "runtime_available", lambda name: name != "openvino")
    with pytest.raises(InferenceError, match="openvino"):
        backends.prepare_runner(load_model(path), "openvino", "fp32")
    lines = []
    runner = backends.prepare_runner(load_model(path), log=lines.append)
    assert runner.backend != "openvino" and any("openvino: not installed" in line for line in lines)
    assert all(c["backend"] != "openvino" for c in runner.checks)


def test_a_disagreeing_backend_is_refused(tmp_path, monkeypatch):
    path = _save(tmp_path)
    real = runtimes.GraphNetwork.forward
    monkeypatch.setattr(runtimes.GraphNetwork, "forward", lambda self, x: real(self, x).flip(1))  # a wrong graph: classes swapped
    with pytest.raises(InferenceError, match="disagrees with PyTorch"):
        backends.prepare_runner(load_model(path), "onnxruntime", "fp32")
    runner = backends.prepare_runner(load_model(path))  # auto: refused, logged, another backend chosen
    assert runner.backend == "torch"
    assert any(c["status"] == "refused" for c in runner.checks if c["backend"] in ("onnxruntime", "openvino"))


def test_graph_backends_refuse_cuda_and_unknown_names(tmp_path):
    model = load_model(_save(tmp_path))
    with pytest.raises(InferenceError, match="unknown backend"):
        backends.prepare_runner(model, "tensorrt")
    with pytest.raises(InferenceError, match="unknown precision"):
        backends.prepare_runner(model, "torch", "int8")
    if torch.cuda.is_available():
        with pytest.raises(InferenceError, match="runs on the CPU"):
            backends.prepare_runner(model, "openvino", device="cuda")


def test_exported_onnx_student_segments_through_the_backends(tmp_path, volume):
    from ReCoKDLib.export import export_model

    image, geometry = volume
    path = _save(tmp_path)
    files = export_model(path, tmp_path / "export", formats=["onnx"])
    graph_model = load_model(files["onnx"])
    assert graph_model.kind == "onnx" and not graph_model.feature_kd
    reference = segment_volume(load_model(path), image, geometry, device="cpu", backend="torch", precision="fp32",
                               window="patch", return_probabilities=True)
    for backend in ("onnxruntime", "openvino"):
        result = segment_volume(graph_model, image, geometry, device="cpu", backend=backend, precision="fp32",
                                window="patch", return_probabilities=True)
        np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=2e-4)
    with pytest.raises(InferenceError, match="exported ONNX graph"):
        segment_volume(graph_model, image, geometry, device="cpu", backend="torch")


def test_strided_stem_network_gives_full_resolution_logits_on_every_backend(tmp_path, volume):
    """A first stage of stride 2 (no convolution at full resolution): logits upsampled to the input
    in eval and in training (MONAI's stacked deep-supervision output), the same through the
    exported graphs as through PyTorch, and its stages at strides 2, 4, 8 for the KD taps."""
    from ReCoKDLib.models.presets import student_taps_for
    from ReCoKDLib.models.window import size_step

    stem = ((2, 2, 2), (2, 2, 2), (2, 2, 2))
    config = preset("tiny", strides=stem)
    assert config.strided_stem and not preset("tiny").strided_stem and config.divisor == (8, 8, 8)
    network = build_unet(config)
    x = torch.randn(2, 1, 16, 24, 32)
    network.train()
    out = network(x)
    assert out.shape == (2, 2, 2, 16, 24, 32)  # (B, 1 + S, K, D, H, W) at the input's size
    out.mean().backward()
    assert network.input_block.conv1.conv.weight.grad is not None
    network.eval()
    with torch.no_grad():
        assert network(x).shape == (2, 2, 16, 24, 32)
    assert student_taps_for([(2, 2, 2), (4, 4, 4)], config) == ["input_block", "downsamples.0"]

    image, geometry = volume
    path = _save(tmp_path, "stem.pt", strides=stem)
    model = load_model(path)
    assert size_step(model) == (8, 8, 8)
    reference = segment_volume(model, image, geometry, device="cpu", backend="torch", precision="fp32",
                               window="patch", return_probabilities=True)
    assert reference.labels.shape == image.shape and reference.geometry == geometry
    for backend in ("onnxruntime", "openvino"):
        result = segment_volume(load_model(path), image, geometry, device="cpu", backend=backend, precision="fp32",
                                window="patch", return_probabilities=True)
        np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=2e-4)
    # the graph is exported once, for the probe's window, and then runs every window: its upsampling
    # must follow the input (a graph that kept the export's size gave mis-shaped logits on a whole head)
    graph = export_onnx(network, torch.zeros(1, 1, 16, 16, 16), tmp_path / "stem.onnx", dynamic_axes=True)
    other = torch.randn(1, 1, 24, 32, 40)
    with torch.no_grad():
        expected = network(other)
    for runtime in ("onnxruntime", "openvino"):
        got = GraphNetwork(graph, runtime, "fp32")(other)
        assert got.shape == expected.shape == (1, 2, 24, 32, 40)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-3)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_graph_networks_logits_are_its_own_after_the_next_call(tmp_path, runtime):
    """OpenVINO hands out its output buffer without a copy (``share_outputs=True``) and reuses it
    on the next call; GraphNetwork copies out of it once, so earlier logits stay as they were."""
    network = build_unet(preset("tiny", num_classes=3)).eval()
    graph = export_onnx(network, torch.zeros(1, 1, 16, 16, 16), tmp_path / "g.onnx", dynamic_axes=True)
    runner = GraphNetwork(graph, runtime, "fp32")
    first_input, second_input = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16)
    first = runner(first_input)
    kept = first.clone()
    second = runner(second_input)
    assert torch.equal(first, kept) and not torch.equal(first, second)
    with torch.no_grad():
        np.testing.assert_allclose(first.numpy(), network(first_input).numpy(), atol=1e-3)


def test_one_window_gives_the_networks_logits_without_dividing_them():
    """One pass (no mirroring) over a one-window volume: the network's own logits come back, equal to
    MONAI's sliding window (no ``out / 1`` copy of a whole-volume map); mirrored passes are averaged."""
    from monai.inferers import sliding_window_inference

    from ReCoKDLib.infer import predict_logits
    from ReCoKDLib.models.base import network_logits

    torch.manual_seed(0)
    unet = build_unet(preset("tiny", num_classes=3)).eval()

    def network(x):
        return network_logits(unet(x))
    image = torch.randn(1, 16, 16, 16)
    made = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = unet

        def forward(self, x):
            made.append(network_logits(self.inner(x)))
            return made[-1]

    logits = predict_logits(Recording(), image, (16, 16, 16), 0.5)
    assert len(made) == 1 and logits.data_ptr() == made[0].data_ptr()  # the network's tensor, not a copy
    with torch.no_grad():
        reference = sliding_window_inference(image[None], roi_size=(16, 16, 16), sw_batch_size=1,
                                             predictor=network, overlap=0.5, mode="gaussian")[0]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    mirrored = predict_logits(unet, image, (16, 16, 16), 0.5, mirror_axes=(2,))
    with torch.no_grad():
        expected = (network(image[None]) + network(image[None].flip(4)).flip(4))[0] / 2
    torch.testing.assert_close(mirrored, expected, atol=1e-5, rtol=1e-5)


def test_export_keeps_the_exporters_output_off_the_terminal(tmp_path, capfd):
    """What the exporters write, from Python or C++ (the TorchScript exporter dumps its IR graph on
    failure: 70 kB for HD-BET), does not reach the user's stdout or stderr; the graph is still written."""
    import os

    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

        def forward(self, x):
            print("python noise")
            os.write(2, b"c-level noise on fd 2\n")
            os.write(1, b"c-level noise on fd 1\n")
            return self.conv(x)

    capfd.readouterr()
    graph = export_onnx(Noisy().eval(), torch.zeros(1, 1, 8, 8, 8), tmp_path / "noisy.onnx")
    out, err = capfd.readouterr()
    assert graph.is_file() and "noise" not in out and "noise" not in err
    print("after")  # the streams work again
    assert capfd.readouterr().out == "after\n"


def test_instance_norms_with_running_statistics_try_the_torch_export_exporter_first(tmp_path, monkeypatch):
    """torch's TorchScript exporter turns an instance norm with running statistics into a batch norm
    that needs a static batch size (torch/onnx/_internal/torchscript_exporter/symbolic_opset9.py,
    instance_norm) and fails late on HD-BET; such networks go to torch.export first."""
    calls = []
    real = torch.onnx.export

    def recording(*args, **kwargs):
        calls.append(kwargs["dynamo"])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", recording)
    plain = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.InstanceNorm3d(2, affine=True)).eval()
    export_onnx(plain, torch.zeros(1, 1, 8, 8, 8), tmp_path / "plain.onnx")
    assert calls == [False]  # MONAI's and nnU-Net's instance norms: the TorchScript exporter, it works
    calls.clear()
    tracking = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.InstanceNorm3d(2, affine=True, track_running_stats=True))
    graph = export_onnx(tracking.eval(), torch.zeros(1, 1, 8, 8, 8), tmp_path / "tracking.onnx")
    assert calls[0] is True and graph.is_file()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(GraphNetwork(graph, "onnxruntime")(x).numpy(), tracking(x).numpy(), atol=1e-4)


def test_onednn_convolution_equals_pytorch_and_stays_out_of_exports():
    torch.manual_seed(0)
    student = build_unet(derive_student_config(preset("ct_demo", num_classes=12), 4)).eval()
    assert any(type(m) is OneDNNConv3d for m in student.modules())
    x = torch.randn(1, 1, 16, 96, 96)
    with torch.no_grad():
        ours = student(x)
        with plain_convolutions(student):
            assert not any(type(m) is OneDNNConv3d for m in student.modules())
            plain = student(x)
    assert any(type(m) is OneDNNConv3d for m in student.modules())
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)
    # the thin layers really run oneDNN now (PyTorch alone picks slow_conv3d_forward for them)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        student(x)
    ops = {e.key: e.count for e in prof.key_averages()}
    assert ops.get("aten::mkldnn_convolution", 0) >= 8
    with torch.no_grad(), plain_convolutions(student), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        student(x)
    assert {e.key: e.count for e in prof.key_averages()}.get("aten::slow_conv3d_forward", 0) >= 8
    # training keeps PyTorch's choice (gradients)
    student.train()
    out = student(torch.randn(1, 1, 16, 96, 96, requires_grad=True))
    out.float().mean().backward()


def test_deep_supervision_heads_run_in_training_only():
    """MONAI's ``DynUNetSkipLayer.forward`` evaluates ``super_head`` in eval mode too
    (monai/networks/nets/dynunet.py, 1.5: ``if self.super_head is not None and self.heads is not None
    and self.index > 0``) though ``DynUNet.forward`` returns the heads only when training; ours skip
    them in eval mode, with MONAI's eval logits and training output unchanged."""
    from monai.networks.nets import DynUNet
    from monai.networks.nets.dynunet import DynUNetSkipLayer

    from ReCoKDLib.networks import heads_in_training_only

    torch.manual_seed(0)
    config = derive_student_config(preset("ct_demo", num_classes=5), 4)
    ours = build_unet(config)
    assert config.deep_supervision and not any(type(m) is DynUNetSkipLayer for m in ours.modules())
    monai = build_unet(config)
    for layer in monai.modules():  # back to MONAI's own layer, same weights
        if isinstance(layer, DynUNetSkipLayer):
            layer.__class__ = DynUNetSkipLayer
    monai.load_state_dict(ours.state_dict())
    calls = []
    hooks = [head.register_forward_hook(lambda *_: calls.append(1)) for head in ours.deep_supervision_heads]
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), monai.eval()(x))
    assert calls == []
    torch.manual_seed(1)
    train_ours = ours.train()(x)
    torch.manual_seed(1)
    torch.testing.assert_close(train_ours, monai.train()(x))
    assert len(calls) == config.deep_supr_num and train_ours.shape[1] == 1 + config.deep_supr_num
    for hook in hooks:
        hook.remove()
    with plain_convolutions(ours.eval()):  # recokd export scripts networks so
        scripted = torch.jit.script(ours)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), monai.eval()(x))
    plain = DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], deep_supervision=False).eval()  # no heads
    with torch.no_grad():
        before = plain(x)
        torch.testing.assert_close(heads_in_training_only(plain)(x), before)


def test_window_is_as_large_as_memory_allows(tmp_path, monkeypatch):
    from ReCoKDLib.models import window as window_module

    model = load_model(_save(tmp_path))
    window, info = choose_window(model, (30, 70, 41))
    assert window == (16, 16, 16) and "InstanceNorm3d" in info["how"]  # normalises over the window: the patch
    monkeypatch.setattr(window_module, "window_dependent_layer", lambda _model: None)  # a fully convolutional net
    window, info = choose_window(model, (30, 70, 41))
    assert window == (32, 72, 44) and "largest window" in info["how"]  # the volume rounded up to the stride (4)
    budget = int(info["bytes_per_voxel"] * 32 * 32 * 32)
    small, info = choose_window(model, (30, 70, 41), budget_bytes=budget)
    assert np.prod(small) * info["bytes_per_voxel"] <= budget and all(w >= 16 and w % 4 == 0 for w in small)
    assert np.prod(small) * info["bytes_per_voxel"] > budget / 2  # no smaller than it needs to be
    assert choose_window(model, (30, 70, 41), budget_bytes=1)[0] == (16, 16, 16)  # never below the patch
    assert choose_window(model, (30, 70, 41), "patch")[0] == (16, 16, 16)
    assert choose_window(model, (30, 70, 41), [8, 24, 32])[0] == (8, 24, 32)
    with pytest.raises(InferenceError, match="multiple"):
        choose_window(model, (30, 70, 41), [10, 24, 32])


def test_window_dependent_layers_are_found():
    from types import SimpleNamespace

    from ReCoKDLib.models.window import window_dependent_layer

    fully_convolutional = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4),
                                              torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1))
    assert window_dependent_layer(SimpleNamespace(network=fully_convolutional, kind="entry_point")) is None
    grouped = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.GroupNorm(2, 4))
    assert window_dependent_layer(SimpleNamespace(network=grouped, kind="entry_point")) == "GroupNorm"
    assert window_dependent_layer(SimpleNamespace(network=build_unet(preset("tiny")), kind="recokd")) == "InstanceNorm3d"
    assert window_dependent_layer(SimpleNamespace(network=build_unet(preset("tiny", norm="batch")), kind="recokd")) is None
    for norm, expected in (({}, "InstanceNorm3d"), ({"norm": "batch"}, None)):  # exported graphs: from the card
        card = SimpleNamespace(architecture={"kind": "dynunet", "config": dict(preset("tiny").to_dict(), **norm)})
        assert window_dependent_layer(SimpleNamespace(network=None, kind="onnx", card=card)) == expected


def test_large_window_result_is_on_the_exact_grid(tmp_path, volume):
    image, geometry = volume
    model = load_model(_save(tmp_path))
    result = segment_volume(model, image, geometry, device="cpu", backend="torch", precision="fp32", window=[32, 40, 36])
    assert result.info["window"] == [32, 40, 36] and result.labels.shape == image.shape
    assert result.info["window_choice"]["how"].startswith("asked for")
    patch = segment_volume(model, image, geometry, device="cpu", backend="torch", precision="fp32")
    assert patch.info["window"] == [16, 16, 16]


def test_the_card_inference_overlap_is_the_default_and_an_explicit_overlap_wins(tmp_path, volume):
    from ReCoKDLib.infer import DEFAULT_OVERLAP, model_overlap

    image, geometry = volume
    model = load_model(_save(tmp_path))
    plain = segment_volume(model, image, geometry, device="cpu", backend="torch", precision="fp32")
    assert model.card.inference == {} and plain.info["overlap"] == DEFAULT_OVERLAP == 0.5
    model.card.inference = {"overlap": 0.25}
    assert model_overlap(model) == 0.25 and model_overlap(model, 0.0) == 0.0
    carded = segment_volume(model, image, geometry, device="cpu", backend="torch", precision="fp32")
    explicit = segment_volume(model, image, geometry, overlap=0.25, device="cpu", backend="torch", precision="fp32")
    assert carded.info["overlap"] == 0.25
    np.testing.assert_array_equal(carded.labels, explicit.labels)
    asked = segment_volume(model, image, geometry, overlap=0.5, device="cpu", backend="torch", precision="fp32")
    assert asked.info["overlap"] == 0.5
    np.testing.assert_array_equal(asked.labels, plain.labels)


@pytest.mark.parametrize("classes", [1, 2, 3, 12])
def test_class_argmax_equals_numpys_first_maximum(classes):
    from ReCoKDLib.restore import class_argmax

    rng = np.random.default_rng(classes)
    probabilities = rng.random((classes, 7, 9, 11)).astype(np.float32)
    probabilities[:, :2] = 0.25  # ties: the first class wins, as with np.argmax
    probabilities[-1, 3, :2] = probabilities[0, 3, :2]
    for values in (probabilities, probabilities.astype(np.float16), np.round(probabilities * 4)):
        np.testing.assert_array_equal(class_argmax(values), np.argmax(values, axis=0))
    with_nan = probabilities.copy()
    with_nan[-1, 4, 5, 6] = np.nan
    np.testing.assert_array_equal(class_argmax(with_nan, np.int32), np.argmax(with_nan, axis=0))


@pytest.mark.parametrize("spacing,target", [((1.3, 1.1, 2.2), [2.0, 1.5, 1.5]), ((0.7, 0.7, 3.0), [3.0, 1.4, 1.4]),
                                            ((1.0, 1.0, 1.0), [1.0, 1.0, 1.0])])
def test_fast_restore_equals_argmax_of_resampled_probabilities(spacing, target):
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (25, 33, 29)).astype(np.float32)
    pre = preprocess_case(image, _geometry(spacing), target, {"scheme": "zscore"})
    logits = torch.from_numpy(rng.normal(0, 1, (4,) + pre.shape).astype(np.float32))
    logits = torch.nn.functional.avg_pool3d(logits[None], 3, 1, 1)[0] * 9  # smooth classes, as networks give
    probabilities = torch.softmax(logits, 0).numpy()
    exact = np.argmax(restore_to_original(probabilities, pre), axis=0)
    fast = restore_labels(probabilities, pre)
    assert fast.shape == image.shape and fast.dtype == np.uint8
    assert np.mean(fast == exact) > 0.999, np.mean(fast == exact)
    if pre.shape == pre.crop_shape:  # the same grid: the argmax itself, exactly
        np.testing.assert_array_equal(fast[tuple(slice(a, b) for a, b in pre.crop_box)], np.argmax(probabilities, 0))


def test_segment_command_takes_backend_window_and_restore(tmp_path, volume, capsys):
    from ReCoKDLib.cli import main
    from ReCoKDLib.data.io import read_image, write_image

    image, geometry = volume
    path = _save(tmp_path)
    source = write_image(image, geometry, tmp_path / "image.nii.gz")
    out = tmp_path / "seg.nii.gz"
    code = main(["segment", str(path), str(source), str(out), "--device", "cpu", "--backend", "openvino",
                 "--precision", "fp32", "--window", "patch", "--restore", "probabilities", "--progress", "json"])
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    done = [e for e in events if e["event"] == "done"][-1]
    assert done["backend"] == "openvino fp32" and done["window"] == [16, 16, 16]
    assert any(e["event"] == "log" and "backend: openvino fp32" in e.get("message", "") for e in events)
    labels, _ = read_image(out)
    reference = segment_volume(load_model(path), image, geometry, device="cpu", backend="torch", precision="fp32",
                               window="patch")
    assert np.mean(labels == reference.labels) > 0.999
    code = main(["segment", str(path), str(source), str(out), "--device", "cpu", "--backend", "onnxruntime",
                 "--precision", "bf16", "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and ("onnxruntime backend runs fp32 only" in err or "no bf16 instructions" in err)


def test_segment_speed_benchmark_smoke(tmp_path, ct_dataset):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import segment_speed

    out = tmp_path / "segment_speed.json"
    assert segment_speed.main(["--smoke", "--in-process", "--reps", "1", "--threads", "1", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"ct_div4_vs_teacher", "fp32_div4_vs_teacher", "nnunet_student_vs_predictor", "hdbet_student_vs_teacher",
            "max_peak_memory_vs_teacher"} <= set(data["headline"])
    assert data["headline"]["ct_div4_vs_teacher"] > 0 and len(data["load_average"]["before"]) == 3
    assert data["date"] and data["machine"] and data["command"].startswith("python benchmarks/segment_speed.py")
    student = data["results"]["ct_div4"]["s1_ct"]
    assert student["before"]["dice_vs_fp32_pytorch"] == 1.0 and student["before"]["window"] == [8, 16, 16]
    assert student["best"]["backend"]["backend"] in ("torch", "onnxruntime", "openvino")
    assert 0 <= student["best"]["dice_vs_fp32_pytorch"] <= 1
    # the backend and precision alone (same window as PyTorch fp32), and S1's reference organs
    assert 0 <= student["best"]["dice_vs_fp32_same_window"] <= 1 and "dice_vs_fp32_same_window" not in student["fp32"]
    assert all(0 <= record["dice_vs_reference"] <= 1 for record in student.values())
    for record in student.values():  # timed and memory runs are separate workers, merged per setting
        assert record["seconds"] > 0 and record["peak_total_bytes"] > 0 and "peak_extra_bytes" in record
        if record["peak_reset"]:  # with the model and its backend's state (in-process: after other workers' frees)
            assert record["peak_with_model_bytes"] > 0
    table = segment_speed.markdown_table(data).splitlines()  # the README's table (--table JSON)
    measured = sum(len(per_setting) for per_case in data["results"].values() for per_setting in per_case.values())
    assert len(table) == 2 + measured and table[2].startswith("| ct_teacher | s1_ct | before | torch fp32 | 8×16×16 |") and table[2].count("|") == 12


def test_segment_speed_memory_headline_counts_what_the_backend_keeps():
    """``max_peak_memory_vs_teacher`` compares the peaks with the model and its backend's state (a
    whole-scan window keeps a scan-sized compiled graph between calls); the call-only ratio is kept
    beside it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import segment_speed

    def record(seconds, with_model, call):
        return {"best": {"seconds": seconds, "peak_with_model_bytes": with_model, "peak_extra_bytes": call}}

    results = {"ct_teacher": {"s1_ct": record(2.0, 500, 100)}, "ct_div4": {"s1_ct": record(1.0, 400, 90)},
               "ct_div4_bn_stem": {"s1_ct": record(0.5, 700, 105)}}
    out = segment_speed.headline(results, {"ct": "s1_ct", "hdbet": "t1_head"})
    assert out["max_peak_memory_vs_teacher"] == 700 / 500 and out["max_call_peak_memory_vs_teacher"] == 105 / 100


def test_segment_speed_retrains_the_demo_students_when_the_demo_options_changed(tmp_path):
    """``--prepare`` runs ``recokd demo --task ct`` again when its students are not of the demo's
    current options (it reuses the teacher and trains the students), and not when they are."""
    import sys
    from dataclasses import replace
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import segment_speed

    from ReCoKDLib.checkpoint import ModelCard, save_model
    from ReCoKDLib.demo import DemoConfig
    from ReCoKDLib.networks import build_unet, derive_student_config, preset

    teacher = preset("ct_demo", num_classes=3)
    demo = DemoConfig()
    for norm, stem, name in ((demo.student_norm, demo.student_stem, "same"), (None, "full", "derived")):
        config = derive_student_config(teacher, 4, norm=norm, stem=stem)
        card = ModelCard({"kind": "dynunet", "config": config.to_dict()}, ["bg", "a", "b"], [3.0, 3.0, 3.0],
                         {"scheme": "zscore"}, [16, 96, 96])
        save_model(tmp_path / f"{name}.pt", build_unet(config).state_dict(), card)
    assert segment_speed._is_demo_student(tmp_path / "same.pt", demo)
    assert not segment_speed._is_demo_student(tmp_path / "derived.pt", demo)
    assert segment_speed._is_demo_student(tmp_path / "derived.pt", replace(demo, student_norm=None, student_stem="full"))
    assert not segment_speed._is_demo_student(tmp_path / "missing.pt", demo)


_SIGNAL_AFTER_OPENVINO = r"""
import gc, os, signal, sys, faulthandler
faulthandler.enable()  # Python's handlers run on the alternate signal stack (SA_ONSTACK)
import torch
from ReCoKDLib.models.runtimes import GraphNetwork, export_onnx
from ReCoKDLib.networks import build_unet, preset
network = build_unet(preset("tiny", num_classes=2)).eval()
graph = export_onnx(network, torch.zeros(1, 1, 16, 16, 16), sys.argv[1])
first = GraphNetwork(graph, "openvino", "fp32")  # as backends.prepare_runner's probe of candidates does
first(torch.zeros(1, 1, 16, 16, 16))
second = GraphNetwork(graph, "openvino", "bf16" if "bf16" in sys.argv[2:] else "fp32")
second(torch.zeros(1, 1, 16, 16, 16))
del first; gc.collect()
del second; gc.collect()  # OpenVINO puts back the first one's stack, freed by now
handled = []
signal.signal(signal.SIGTERM, lambda signum, frame: handled.append(signum))
os.kill(os.getpid(), signal.SIGTERM)
print("handled", handled)
"""


def test_a_signal_after_openvino_is_handled_not_a_crash(tmp_path):
    # OpenVINO 2026.4 swaps the thread's sigaltstack for its own and, with two compiled models
    # freed in creation order, leaves a freed one installed; the next signal (the engine's SIGTERM
    # test after an auto-backend probe) crashed the process (exit 139 in CI). GraphNetwork
    # restores the thread's own stack after every OpenVINO call. Without that this exits 139.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_OPENVINO, str(tmp_path / "g.onnx")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "handled [15]" in done.stdout

