"""The training engine in-process: schedules, distillation, teacher training, NaN handling, cancel."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from ReCoKDLib import engine
from ReCoKDLib.checkpoint import ModelCard, load_model_file, safe_torch_load, save_model, sha256_file
from ReCoKDLib.data.sampling import CaseArrays, CaseSet, prepare_cases
from ReCoKDLib.engine import (
    TrainConfig,
    TrainingDivergedError,
    TrainingError,
    deep_supervision_weights,
    distill,
    kd_lambda,
    poly_lr,
    train_teacher,
)
from ReCoKDLib.losses.base import KDOutput
from ReCoKDLib.models import backends
from ReCoKDLib.networks import build_unet, encoder_tap_names, preset
from ReCoKDLib.progress import Reporter

CT_NORMALIZATION = {"scheme": "ct", "clip": [-200.0, 300.0], "mean": 50.0, "std": 60.0}


@pytest.fixture(scope="module")
def ct_cases(tiny_ct_case, ct_dataset, tmp_path_factory) -> CaseSet:
    """The real 32x64x64 CT crop, preprocessed at 3 mm (classes of the CT dataset)."""
    from ReCoKDLib.data.preprocess import preprocess_case

    params = {"spacing": [3.0, 3.0, 3.0], "normalization": CT_NORMALIZATION}
    return prepare_cases([tiny_ct_case], ct_dataset.class_names, preprocess_case, params,
                         tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def teacher_file(ct_cases, tmp_path_factory):
    """A randomly initialised tiny teacher saved as a ReCoKD model file."""
    torch.manual_seed(0)
    config = preset("tiny", num_classes=ct_cases.num_classes)
    card = ModelCard({"kind": "dynunet", "config": config.to_dict()}, ct_cases.class_names, [3.0, 3.0, 3.0],
                     CT_NORMALIZATION, [16, 32, 32], tap_names=encoder_tap_names(config))
    return save_model(tmp_path_factory.mktemp("teacher") / "teacher.pt", build_unet(config).state_dict(), card)


def _config(**changes) -> TrainConfig:
    base = dict(patch_size=(16, 32, 32), batch_size=2, steps=6, num_val_cases=0, checkpoint_every=2, val_every=100,
                optimizer="adamw", lr=3e-3, kd={"logit": {"weight": 1.0}, "fitnet": {"weight": 1.0}}, kd_weight=1.0,
                kd_warmup_steps=0, student_reduction=2, deterministic=True, seed=1,
                augmentation={"enabled": False})
    base.update(changes)
    return TrainConfig(**base)


class _Events(Reporter):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict] = []
        self.callback = self.events.append

    def of(self, event: str, stage: str | None = None) -> list[dict]:
        return [e for e in self.events if e["event"] == event and stage in (None, e.get("stage"))]


def test_pure_schedules():
    assert poly_lr(0.01, 0, 100) == 0.01 and poly_lr(0.01, 100, 100) == 0.0
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert kd_lambda(0, 0.01, 600) == 0.0 and kd_lambda(300, 0.01, 600) == pytest.approx(0.005)
    assert kd_lambda(900, 0.01, 600) == pytest.approx(0.01) and kd_lambda(0, 0.01, 0) == pytest.approx(0.01)
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_train_config_round_trip_and_errors():
    config = _config(kd={"recokd": {"weight": 1.0, "stage_alpha": 0.5}})
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(TrainingError, match="unknown training options"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(TrainingError, match="optimizer must be"):
        TrainConfig(optimizer="lion")
    with pytest.raises(TrainingError, match=r"inference_overlap must be in \[0, 1\)"):
        TrainConfig(inference_overlap=1.0)


def test_distill_lowers_the_loss_and_writes_a_student_card(ct_cases, teacher_file, tmp_path):
    events = _Events()
    result = distill(_config(steps=12, oversample_foreground=1.0, inference_overlap=0.25), teacher_file, ct_cases,
                     tmp_path / "s", events)
    totals = [e["losses"]["total"] for e in events.of("progress", "distill")]
    assert len(totals) == 12 and all(math.isfinite(t) for t in totals)
    assert np.mean(totals[-3:]) < np.mean(totals[:3])
    assert {"seg", "kd", "logit", "fitnet", "kd_lambda"} <= set(events.of("progress", "distill")[0]["losses"])
    card, state = load_model_file(result.last_model)
    assert card.role == "student" and card.classes == ct_cases.class_names
    assert card.architecture["config"]["filters"] == [8, 8, 16]  # tiny (8, 16, 32) halved, floor 8
    assert card.provenance["teacher_sha256"] == sha256_file(teacher_file)
    assert card.kd["methods"] == {"logit": {"weight": 1.0}, "fitnet": {"weight": 1.0}}
    assert card.spacing == [3.0, 3.0, 3.0] and card.normalization == CT_NORMALIZATION
    assert card.inference == {"overlap": 0.25}  # what recokd segment slides the student's windows by
    student = build_unet(preset("tiny", num_classes=12, filters=(8, 8, 16)))
    student.load_state_dict(state)  # the file rebuilds the student
    assert events.of("done")[-1]["path"] == str(result.last_model) and result.step == 12


def test_recokd_modules_are_trained_unless_frozen_aux(ct_cases, teacher_file, tmp_path):
    runs = {}
    for frozen in (False, True):
        result = distill(_config(steps=2, kd={"recokd": {"weight": 1.0}}, frozen_aux=frozen, student_reduction=4),
                         teacher_file, ct_cases, tmp_path / str(frozen))
        runs[frozen] = safe_torch_load(result.checkpoint)["aux"]
    for part in ("adapters", "kd_loss"):  # 1x1x1 adapters and ReCo-KD's context blocks
        trained, frozen = runs[False][part], runs[True][part]
        assert trained and any(not torch.equal(trained[k], frozen[k]) for k in trained), part


def test_train_teacher_validates_and_keeps_best(ct_cases, tmp_path):
    twin = CaseArrays("twin", np.array(ct_cases.cases[0].image), np.array(ct_cases.cases[0].label))
    cases = CaseSet([ct_cases.cases[0], twin], ct_cases.class_names, [3.0, 3.0, 3.0], CT_NORMALIZATION)
    events = _Events()
    config = _config(steps=4, num_val_cases=1, val_every=2, network=preset("tiny").to_dict(), kd={})
    result = train_teacher(config, cases, tmp_path / "t", events)
    metrics = events.of("metrics")
    assert [m["step"] for m in metrics] == [2, 4] and all(m["stage"] == "validate" for m in metrics)
    assert set(metrics[0]["metrics"]["dice"]) == set(ct_cases.class_names[1:])
    assert result.best_model is not None and result.best_model.exists()
    card, _ = load_model_file(result.best_model)
    assert card.role == "teacher" and card.architecture["config"]["num_classes"] == 12
    assert card.metrics["validation"]["mean_dice"] == pytest.approx(result.metrics["best_mean_dice"])
    history = json.loads((tmp_path / "t" / "history.json").read_text())
    assert len(history["train"]) == 4 and len(history["val"]) == 2


class _NaNInjector(nn.Module):
    """A KD loss stand-in: logit KD, but NaN on the calls listed in ``nan_calls`` (1-based)."""

    def __init__(self, nan_calls, after=None, on_call=None):
        super().__init__()
        self.calls = 0
        self.nan_calls, self.after, self.on_call = set(nan_calls), after, on_call

    def forward(self, batch, return_maps=False):
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        loss = torch.nn.functional.mse_loss(batch.student_logits, batch.teacher_logits)
        if self.calls in self.nan_calls or (self.after is not None and self.calls > self.after):
            loss = loss * float("nan")
        return KDOutput(loss=loss, terms={"mse": loss.detach()})


def _patch_kd(monkeypatch, module):
    monkeypatch.setattr(engine.jobs, "build_kd_module", lambda *a, **k: module)


def test_a_nan_loss_skips_the_step_with_a_warning(ct_cases, teacher_file, tmp_path, monkeypatch):
    _patch_kd(monkeypatch, _NaNInjector({2}))
    events = _Events()
    result = distill(_config(steps=4), teacher_file, ct_cases, tmp_path / "n", events)
    warnings = events.of("warning")
    assert len(warnings) == 1 and "non-finite loss or gradients at step 2" in warnings[0]["message"]
    assert result.step == 4 and [e["step"] for e in events.of("progress", "distill")] == [1, 3, 4]
    assert all(torch.isfinite(p).all() for p in result.network.parameters())


class _NaNGradient(nn.Module):
    """A KD loss stand-in whose loss is finite but whose gradient is NaN on the listed calls."""

    def __init__(self, nan_calls):
        super().__init__()
        self.calls, self.nan_calls = 0, set(nan_calls)

    def forward(self, batch, return_maps=False):
        self.calls += 1
        loss = torch.nn.functional.mse_loss(batch.student_logits, batch.teacher_logits)
        if self.calls in self.nan_calls:  # d/dx sqrt(x) at 0 is inf; times 0 -> NaN, the value stays finite
            loss = loss + 0.0 * torch.sqrt(batch.student_logits.float() * 0.0).sum()
        return KDOutput(loss=loss, terms={"mse": loss.detach()})


def test_nan_gradients_with_a_finite_loss_skip_the_step(ct_cases, teacher_file, tmp_path, monkeypatch):
    _patch_kd(monkeypatch, _NaNGradient({2}))
    events = _Events()
    result = distill(_config(steps=4, kd_warmup_steps=0), teacher_file, ct_cases, tmp_path / "g", events)
    warnings = events.of("warning")
    assert len(warnings) == 1 and "non-finite loss or gradients at step 2" in warnings[0]["message"]
    assert result.step == 4 and all(torch.isfinite(p).all() for p in result.network.parameters())


class _OverflowsInBF16(nn.Module):
    """A KD loss stand-in whose gradient is NaN whenever CPU autocast is on (as bf16 overflowed in a
    ReCo-KD student's convolution backward), finite in float32; records the autocast state per call."""

    def __init__(self):
        super().__init__()
        self.autocast_per_call: list[bool] = []

    def forward(self, batch, return_maps=False):
        under_autocast = torch.is_autocast_enabled("cpu")
        self.autocast_per_call.append(under_autocast)
        loss = torch.nn.functional.mse_loss(batch.student_logits.float(), batch.teacher_logits.float())
        if under_autocast:
            loss = loss + 0.0 * torch.sqrt(batch.student_logits.float() * 0.0).sum()
        return KDOutput(loss=loss, terms={"mse": loss.detach()})


def test_a_bf16_overflow_redoes_the_step_in_float32_and_stays_there(ct_cases, teacher_file, tmp_path, monkeypatch):
    kd = _OverflowsInBF16()
    _patch_kd(monkeypatch, kd)
    monkeypatch.setattr(engine.loop, "FP32_AFTER_OVERFLOW", 3)
    monkeypatch.setattr(backends, "cpu_supports_bf16", lambda: True)  # whatever this CPU has
    events = _Events()
    # every bf16 step would be skipped and max_nonfinite=2 would stop the run; redone in float32 it trains on
    result = distill(_config(steps=8, bf16=True, max_nonfinite=2), teacher_file, ct_cases, tmp_path / "b", events)
    assert result.step == 8 and all(torch.isfinite(p).all() for p in result.network.parameters())
    # step 1 in bf16 overflows -> redone in fp32 -> steps 2-3 fp32 -> step 4 bf16 again overflows -> ...
    assert kd.autocast_per_call == [True, False, False, False, True, False, False, False, True, False, False]
    assert result.history["fp32_redone"] == [1, 4, 7]
    warnings = [w["message"] for w in events.of("warning")]
    assert len(warnings) == 3 and "bfloat16 autocast gave NaN/Inf at step 1: step redone in float32 (finite)" in warnings[0]
    assert not any("skipped" in w for w in warnings)
    state = safe_torch_load(tmp_path / "b" / "checkpoint.pt")
    assert state["fp32_until"] == 9 and json.loads(state["history"])["fp32_redone"] == [1, 4, 7]
    assert load_model_file(result.last_model)[0].metrics["training_precision"] == "bf16"  # the run's, redone steps apart


def test_bf16_on_a_cpu_without_bf16_kernels_trains_in_float32_with_a_warning(ct_cases, teacher_file, tmp_path,
                                                                            monkeypatch):
    kd = _OverflowsInBF16()
    _patch_kd(monkeypatch, kd)
    monkeypatch.setattr(backends, "cpu_supports_bf16", lambda: False)  # an AVX2-only CPU
    events = _Events()
    result = distill(_config(steps=3, bf16=True), teacher_file, ct_cases, tmp_path / "f", events)
    assert result.step == 3 and kd.autocast_per_call == [False, False, False]
    warnings = [w["message"] for w in events.of("warning")]
    assert len(warnings) == 1 and "no bf16 kernels" in warnings[0] and "float32" in warnings[0]
    assert load_model_file(result.last_model)[0].metrics["training_precision"] == "fp32"  # what it ran in, not asked


def test_repeated_nan_stops_with_the_last_checkpoint_intact(ct_cases, teacher_file, tmp_path, monkeypatch):
    _patch_kd(monkeypatch, _NaNInjector((), after=3))
    events = _Events()
    with pytest.raises(TrainingDivergedError, match="3 consecutive steps"):
        distill(_config(steps=10, max_nonfinite=3), teacher_file, ct_cases, tmp_path / "d", events)
    assert "NaN/Inf" in events.of("error")[-1]["message"]
    state = safe_torch_load(tmp_path / "d" / "checkpoint.pt")
    assert state["step"] == 4  # written at step 2 and 4 (steps 4..6 were NaN: not saved)
    assert all(torch.isfinite(v).all() for v in state["network"].values() if v.is_floating_point())


def test_stop_file_cancels_cleanly_and_resume_finishes(ct_cases, teacher_file, tmp_path, monkeypatch):
    out = tmp_path / "c"

    def stop_after_three(call):
        if call == 3:
            (out / "STOP").write_text("")

    _patch_kd(monkeypatch, _NaNInjector((), on_call=stop_after_three))
    events = _Events()
    result = distill(_config(steps=8), teacher_file, ct_cases, out, events)
    assert result.cancelled and result.step == 3 and not (out / "STOP").exists()
    assert events.of("done")[-1]["cancelled"] is True
    assert safe_torch_load(out / "checkpoint.pt")["step"] == 3 and result.last_model.exists()

    with pytest.raises(TrainingError, match="pass resume"):
        distill(_config(steps=8), teacher_file, ct_cases, out)
    _patch_kd(monkeypatch, _NaNInjector(()))
    # A resumed run is the checkpoint's run: an option that differs from it is named and ignored.
    events = _Events()
    resumed = distill(_config(steps=8, lr=1e-2), teacher_file, ct_cases, out, events, resume=True)
    assert not resumed.cancelled and resumed.step == 8
    (warning,) = [e["message"] for e in events.of("warning") if "resuming" in e["message"]]
    assert "lr differ" in warning and "ignored" in warning
    assert json.loads(safe_torch_load(out / "checkpoint.pt")["config"])["lr"] == 3e-3  # the checkpoint's own
    events = _Events()  # a new budget is the same run: nothing to warn about
    assert distill(_config(steps=10), teacher_file, ct_cases, out, events, resume=True).step == 10
    assert not [e for e in events.of("warning") if "resuming" in e["message"]]


def test_patch_not_multiple_of_strides_is_refused(ct_cases, teacher_file, tmp_path):
    events = _Events()
    with pytest.raises(TrainingError, match=r"multiple of \(4, 4, 4\)"):
        distill(_config(patch_size=(15, 32, 32)), teacher_file, ct_cases, tmp_path / "p", events)
    assert events.of("error")


def test_sigterm_cancels_with_a_final_checkpoint(ct_cases, teacher_file, tmp_path, monkeypatch):
    import os
    import signal

    def terminate(call):
        if call == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the engine: finish the step, save, return

    _patch_kd(monkeypatch, _NaNInjector((), on_call=terminate))
    previous = signal.getsignal(signal.SIGTERM)
    result = distill(_config(steps=6), teacher_file, ct_cases, tmp_path / "t", _Events())
    assert result.cancelled and result.step == 2
    assert safe_torch_load(result.checkpoint)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is restored


def test_early_stopping_keeps_the_best_model(ct_cases, tmp_path, monkeypatch):
    scores = iter([0.5, 0.4, 0.3])
    monkeypatch.setattr(engine.loop, "validate",
                        lambda *a, **k: {"mean_dice": next(scores), "dice": {}, "cases": 1})
    twin = CaseArrays("twin", np.array(ct_cases.cases[0].image), np.array(ct_cases.cases[0].label))
    cases = CaseSet([ct_cases.cases[0], twin], ct_cases.class_names, [3.0, 3.0, 3.0], CT_NORMALIZATION)
    config = _config(steps=10, num_val_cases=1, val_every=1, patience=1, network=preset("tiny").to_dict(), kd={})
    result = train_teacher(config, cases, tmp_path / "e", _Events())
    assert result.stopped_early and result.step == 2
    assert result.metrics["best_mean_dice"] == 0.5 and result.metrics["best_step"] == 1
    assert load_model_file(result.best_model)[0].metrics["step"] == 1


def test_state_hash_covers_zero_dim_buffers_and_changes_with_the_weights():
    from ReCoKDLib.engine.state import state_sha256

    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2))  # num_batches_tracked: 0-dim
    first = state_sha256(network)
    network[1].num_batches_tracked += 1
    second = state_sha256(network)
    with torch.no_grad():
        network[0].weight.add_(1.0)
    assert len({first, second, state_sha256(network)}) == 3


def test_a_batch_norm_student_is_fully_convolutional_and_segments_in_a_large_window(ct_cases, teacher_file, tmp_path):
    """``student_norm="batch"``: the derived student has BatchNorm3d (the teacher instance norm), its card says so,
    and Segment's ``--window auto`` gives it the largest window instead of the training patch."""
    from ReCoKDLib.infer import segment_volume
    from ReCoKDLib.models.loading import load_model
    from ReCoKDLib.models.window import choose_window, window_dependent_layer

    result = distill(_config(steps=2, student_norm="batch"), teacher_file, ct_cases, tmp_path / "bn", _Events())
    norms = {type(m).__name__ for m in result.network.modules() if "Norm" in type(m).__name__}
    assert norms == {"BatchNorm3d"}
    card, _ = load_model_file(result.last_model)
    assert card.architecture["config"]["norm"] == "batch" and "norm" not in load_model_file(teacher_file)[0].architecture["config"]
    student, teacher = load_model(result.last_model), load_model(teacher_file)
    assert window_dependent_layer(student) is None and window_dependent_layer(teacher) == "InstanceNorm3d"
    shape = (40, 100, 90)
    assert choose_window(student, shape)[0] == (40, 100, 92) and choose_window(teacher, shape)[0] == (16, 32, 32)
    image = ct_cases.cases[0].image[0]
    from ReCoKDLib.data.io import Geometry

    segmented = segment_volume(student, image, Geometry((3.0, 3.0, 3.0)), device="cpu", backend="torch",
                               precision="fp32")
    assert segmented.labels.shape == image.shape and segmented.info["window"] != [16, 32, 32]
    with pytest.raises(TrainingError, match="student_norm"):  # an explicit architecture carries its own norm
        distill(_config(steps=1, student_norm="batch", student_config=preset("tiny", num_classes=ct_cases.num_classes)
                        .to_dict()), teacher_file, ct_cases, tmp_path / "explicit", _Events())
    with pytest.raises(TrainingError, match="student_norm must be"):
        _config(student_norm="layer")


def test_a_strided_stem_student_drops_the_full_resolution_stage_and_taps_the_teacher_at_its_strides(ct_cases,
                                                                                                    tmp_path):
    """``student_stem="strided"`` (``recokd distill --student-stem strided``): the derived student has no
    full-resolution stage, its KD taps pair each of its stages with the teacher's stage at the same
    stride (the teacher's full-resolution tap left out), and it segments at the input's size."""
    from ReCoKDLib.infer import segment_volume
    from ReCoKDLib.models.loading import load_model
    from ReCoKDLib.data.io import Geometry
    from ReCoKDLib.networks import NetworkConfigError, UNetConfig, cumulative_strides, derive_student_config

    torch.manual_seed(0)
    config = preset("tiny", num_classes=ct_cases.num_classes, filters=(8, 16, 16, 32),
                    strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)), kernel_sizes=((1, 3, 3),) + ((3, 3, 3),) * 3,
                    deep_supr_num=2)
    card = ModelCard({"kind": "dynunet", "config": config.to_dict()}, ct_cases.class_names, [3.0, 3.0, 3.0],
                     CT_NORMALIZATION, [16, 32, 32], tap_names=encoder_tap_names(config))
    teacher = save_model(tmp_path / "teacher4.pt", build_unet(config).state_dict(), card)
    result = distill(_config(steps=2, student_stem="strided", kd={"recokd": {"weight": 1.0}}), teacher, ct_cases,
                     tmp_path / "stem", _Events())
    student_card, _ = load_model_file(result.last_model)
    student = UNetConfig.from_dict(student_card.architecture["config"])
    assert student.strided_stem and student.strides[0] == (1, 2, 2) and student.filters == (8, 8, 16)
    assert student.kernel_sizes[0] == (1, 3, 3) and student.num_stages == 3
    kd = student_card.kd
    assert kd["teacher_taps"] == ["downsamples.0", "downsamples.1"] and kd["student_taps"] == ["input_block", "downsamples.0"]
    teacher_at = dict(zip(encoder_tap_names(config, drop_deepest=False), cumulative_strides(config)))
    student_at = dict(zip(encoder_tap_names(student, drop_deepest=False), cumulative_strides(student)))
    assert [teacher_at[t] for t in kd["teacher_taps"]] == [student_at[s] for s in kd["student_taps"]]
    image = ct_cases.cases[0].image[0]
    segmented = segment_volume(load_model(result.last_model), image, Geometry((3.0, 3.0, 3.0)), device="cpu",
                               backend="torch", precision="fp32")
    assert segmented.labels.shape == image.shape
    with pytest.raises(NetworkConfigError, match="only 3 stages"):
        derive_student_config(preset("tiny", num_classes=3), 2, stem="strided")
    with pytest.raises(NetworkConfigError, match="stem must be"):
        derive_student_config(config, 2, stem="pooled")
    with pytest.raises(TrainingError, match="student_stem must be"):
        _config(student_stem="pooled")
    tiny = preset("tiny", num_classes=ct_cases.num_classes)
    shallow = save_model(tmp_path / "teacher3.pt", build_unet(tiny).state_dict(),
                         ModelCard({"kind": "dynunet", "config": tiny.to_dict()}, ct_cases.class_names,
                                   [3.0, 3.0, 3.0], CT_NORMALIZATION, [16, 32, 32], tap_names=encoder_tap_names(tiny)))
    with pytest.raises(TrainingError, match="cannot be derived from this teacher: .*only 3 stages"):
        distill(_config(steps=1, student_stem="strided"), shallow, ct_cases, tmp_path / "shallow", _Events())
    with pytest.raises(TrainingError, match="cannot be derived from this teacher: reduction must be a power of two"):
        distill(_config(steps=1, student_reduction=3), teacher, ct_cases, tmp_path / "odd", _Events())
    with pytest.raises(TrainingError, match="student_stem"):  # an explicit architecture carries its own strides
        distill(_config(steps=1, student_stem="strided", student_config=preset("tiny", num_classes=ct_cases.num_classes)
                        .to_dict()), teacher, ct_cases, tmp_path / "explicit", _Events())
