"""The teacher-output cache: same targets as a live teacher, identical augmentation, invalidation,
resume after ``kill -9``, and the engine running the teacher once per case instead of every step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ReCoKDLib.data.sampling import AugmentationConfig, CaseArrays, CaseSet, PatchSampler
from ReCoKDLib.engine.teacher_cache import (
    CachePlan,
    TeacherOutputCache,
    attach_teacher_targets,
    bytes_per_voxel,
    choose_mode,
    volume_outputs,
)
from ReCoKDLib.taps import FeatureTaps

CLASSES = ["background", "blob"]
HERE = Path(__file__).resolve().parent


class PointwiseTeacher(nn.Module):
    """A fully convolutional teacher without spatial context: its output on a patch is exactly the
    crop of its output on the whole volume, so cached and live targets can be compared voxel by voxel.
    Taps: ``mix`` (stride 1, 3 channels) and ``pool`` (2x2x2 average, stride 2, 3 channels)."""

    def __init__(self, seed: int = 0, delay_s: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.mix = nn.Conv3d(1, 3, 1)
        self.pool = nn.AvgPool3d(2)
        self.head = nn.Conv3d(3, 2, 1)
        self.delay_s = delay_s

    def forward(self, x):
        if self.delay_s:
            time.sleep(self.delay_s)
        m = torch.tanh(self.mix(x))
        self.pool(m)  # tapped only
        return self.head(m)


class IdentityTeacher(nn.Module):
    """Logits ``[x, -x]`` and a stride-2 average-pooled copy of ``x``: spatial augmentation of the
    cached targets must reproduce the augmentation of the image exactly (logits) or consistently
    (features)."""

    def __init__(self) -> None:
        super().__init__()
        self.copy = nn.Identity()
        self.pool = nn.AvgPool3d(2)

    def forward(self, x):
        self.pool(self.copy(x))
        return torch.cat([x, -x], dim=1)


def _forward(network: nn.Module, taps: list[str]):
    hooks = FeatureTaps(network, taps)

    @torch.no_grad()
    def forward(x):
        return network(x), hooks.collect()

    return forward


def _cases(n: int = 3, shape=(20, 24, 28), offset: float = 0.0, smooth: bool = False) -> CaseSet:
    rng = np.random.default_rng(0)
    cases = []
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for i in range(n):
        if smooth:  # low spatial frequencies: resampling at stride 2 keeps them
            image = sum(np.sin(2 * np.pi * (sum(f * g for f, g in zip(rng.uniform(-0.08, 0.08, 3), grid)) + rng.random()))
                        for _ in range(4))[None].astype(np.float32) + offset
        else:
            image = (rng.normal(size=(1, *shape)) + offset).astype(np.float32)
        label = np.full((1, *shape), -1000, np.int16)  # unlabelled (label-free)
        cases.append(CaseArrays(f"case{i}", image, label))
    return CaseSet(cases, CLASSES, [1.5, 1.5, 1.5], {"scheme": "zscore"}, {f"case{i}": f"sha{i}" for i in range(n)})


def _plan(sha="teacher-a", taps=("mix", "pool"), strides=((1, 1, 1), (2, 2, 2))) -> CachePlan:
    return CachePlan(sha, tuple(taps), tuple(strides), (16, 16, 16), (2, 2, 2))


def test_cached_targets_equal_a_live_teacher_on_a_patch(tmp_path):
    teacher = PointwiseTeacher().eval()
    forward = _forward(teacher, ["mix", "pool"])
    cases, record = attach_teacher_targets(_cases(), forward, _plan(), tmp_path / "cache")
    assert record["mode"] == "cache" and record["exact"] and record["computed"] == 3 and record["reused"] == 0
    assert cases.cases[0].teacher.logits.dtype == np.float16
    sampler = PatchSampler(cases, (8, 12, 16), oversample_foreground=0.0, augmentation=None, seed=3)
    assert sampler.align == (2, 2, 2)
    for _ in range(3):
        batch = sampler.draw(2)
        live_logits, (live_mix, live_pool) = forward(batch.images)
        # padding beyond the volume: the live teacher sees zeros there, the cache holds nothing
        inside = batch.images != 0
        assert torch.allclose(batch.teacher_logits * inside, live_logits * inside, atol=2e-3, rtol=1e-3)
        assert torch.allclose(batch.teacher_features[0] * inside, live_mix * inside, atol=2e-3, rtol=1e-3)
        assert batch.teacher_features[1].shape == live_pool.shape == (2, 3, 4, 6, 8)
        pooled_inside = nn.functional.avg_pool3d(inside.float(), 2) == 1
        assert torch.allclose(batch.teacher_features[1] * pooled_inside, live_pool * pooled_inside, atol=2e-3)


def test_a_whole_volume_pass_is_the_teachers_own_output_and_sliding_window_is_flagged(tmp_path):
    from ReCoKDLib.networks import build_unet, encoder_tap_names, preset

    config = preset("tiny", num_classes=2, in_channels=1)
    torch.manual_seed(0)
    teacher = build_unet(config).eval()
    taps = encoder_tap_names(config)[:2]
    forward = _forward(teacher, taps)
    image = torch.randn(1, 20, 24, 28)
    plan = CachePlan("t", tuple(taps), ((1, 1, 1), (2, 2, 2)), (16, 16, 16), tuple(config.divisor))
    logits, features, exact = volume_outputs(forward, image, plan)
    assert exact and logits.shape == (2, 20, 24, 28) and features[1].shape == (16, 10, 12, 14)
    pads = []  # the volume padded at the end to the network's divisor, with its minimum
    for size, step in reversed(list(zip(image.shape[1:], config.divisor))):
        pads += [0, -(-size // step) * step - size]
    padded = torch.nn.functional.pad(image[None], pads, value=float(image.min()))
    with torch.no_grad():
        direct = teacher(padded)
        direct = direct[:, 0] if direct.dim() == 6 else direct
    assert torch.allclose(logits, direct[0, :, :20, :24, :28], atol=1e-5)
    small = CachePlan("t", tuple(taps), ((1, 1, 1), (2, 2, 2)), (16, 16, 16), tuple(config.divisor), max_whole_voxels=1000)
    window_logits, window_features, exact = volume_outputs(forward, image, small)
    assert not exact and window_logits.shape == logits.shape and window_features[1].shape == features[1].shape
    assert choose_mode("auto", small, [(20, 24, 28)])[0] == "live"
    assert choose_mode("auto", plan, [(20, 24, 28)])[0] == "cache"
    assert choose_mode("cache", small, [(20, 24, 28)])[0] == "cache"
    assert "sliding window" in choose_mode("cache", small, [(20, 24, 28)])[1]


def test_spatial_augmentation_is_applied_identically_and_intensity_to_the_image_only(tmp_path):
    forward = _forward(IdentityTeacher().eval(), ["copy", "pool"])
    cases, _ = attach_teacher_targets(_cases(2, (24, 24, 24), smooth=True), forward, _plan(taps=("copy", "pool")),
                                      tmp_path)
    spatial = dict(p_affine=1.0, rotate_deg=20.0, flip_axes=(0, 1, 2), p_noise=0.0, p_brightness=0.0, p_gamma=0.0)
    plain = PatchSampler(cases, (16, 16, 16), 0.0, AugmentationConfig(**spatial), seed=5).draw(3)
    # logits are the image at full resolution: the same affine transform and flips give the same patch
    assert torch.allclose(plain.teacher_logits[:, :1], plain.images, atol=3e-3)
    assert torch.allclose(plain.teacher_logits[:, 1:], -plain.images, atol=3e-3)
    assert torch.allclose(plain.teacher_features[0], plain.images, atol=3e-3)
    # stride-2 features: resampled at their own resolution, they agree with pooling the augmented image
    pooled = nn.functional.avg_pool3d(plain.images, 2)
    inside = (pooled != 0).flatten().numpy()  # leave out the zeros the rotation brings in at the corners
    corr = np.corrcoef(pooled.flatten().numpy()[inside], plain.teacher_features[1].flatten().numpy()[inside])[0, 1]
    assert corr > 0.98
    flips_only = PatchSampler(cases, (16, 16, 16), 0.0, AugmentationConfig(**{**spatial, "p_affine": 0.0}), seed=5).draw(3)
    assert torch.allclose(flips_only.teacher_features[1], nn.functional.avg_pool3d(flips_only.images, 2), atol=3e-3)
    # intensity augmentation: the image changes, the teacher's targets do not
    noisy = PatchSampler(cases, (16, 16, 16), 0.0, AugmentationConfig(**{**spatial, "p_noise": 1.0, "p_gamma": 1.0,
                                                                         "p_brightness": 1.0}), seed=5).draw(3)
    assert not torch.allclose(noisy.images, plain.images, atol=1e-2)
    assert torch.equal(noisy.teacher_logits, plain.teacher_logits)
    assert all(torch.equal(a, b) for a, b in zip(noisy.teacher_features, plain.teacher_features))
    assert torch.equal(noisy.labels, plain.labels)


def test_cache_is_reused_and_invalidated_when_the_teacher_or_the_preprocessing_changes(tmp_path):
    root = tmp_path / "cache"
    forward = _forward(PointwiseTeacher().eval(), ["mix", "pool"])
    first, record = attach_teacher_targets(_cases(), forward, _plan(), root)
    again, record = attach_teacher_targets(_cases(), forward, _plan(), root)
    assert record["computed"] == 0 and record["reused"] == 3
    assert np.array_equal(first.cases[1].teacher.logits, again.cases[1].teacher.logits)
    other_teacher = _forward(PointwiseTeacher(seed=1).eval(), ["mix", "pool"])
    changed, record = attach_teacher_targets(_cases(), other_teacher, _plan(sha="teacher-b"), root)
    assert record["computed"] == 3
    assert not np.allclose(changed.cases[0].teacher.logits, first.cases[0].teacher.logits)
    shifted, record = attach_teacher_targets(_cases(offset=0.5), forward, _plan(), root)  # other preprocessed values
    assert record["computed"] == 3
    respaced = _cases()
    respaced.spacing = [2.0, 2.0, 2.0]  # same bytes, other preprocessing record
    assert attach_teacher_targets(respaced, forward, _plan(), root)[1]["computed"] == 3
    fewer_taps = attach_teacher_targets(_cases(), forward, _plan(taps=("mix",), strides=((1, 1, 1),)), root)
    assert fewer_taps[1]["computed"] == 3 and fewer_taps[0].cases[0].teacher.features[0].shape[0] == 3
    # an entry without its meta.json (a crash before the rename, or another layout) is never read
    key_dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    (key_dirs[0] / "meta.json").unlink()
    assert TeacherOutputCache(root).load(key_dirs[0].name) is None
    assert bytes_per_voxel(2, [3, 3], [(1, 1, 1), (2, 2, 2)]) == pytest.approx(2 * (2 + 3 + 3 / 8))


def _child_build(cache_dir: str) -> None:
    """Run in a child process by the kill -9 test: a slow teacher over 4 cases."""
    forward = _forward(PointwiseTeacher(delay_s=1.0).eval(), ["mix", "pool"])
    attach_teacher_targets(_cases(4), forward, _plan(), cache_dir)


def test_an_interrupted_build_resumes_after_kill_9(tmp_path):
    root = tmp_path / "cache"
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_teacher_cache as t; t._child_build({str(root)!r})"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=str(HERE.parent))
    try:
        # a safety net only (not a timing assertion): on a loaded machine the child's imports alone
        # took over 2 minutes under `nice -n 19`
        deadline = time.monotonic() + 900
        done: list = []
        while time.monotonic() < deadline:
            done = [p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
            if len(done) >= 2 or child.poll() is not None:
                break
            time.sleep(0.05)
        assert child.poll() is None, "the child finished before it could be killed"
        assert len(done) >= 2, f"the child wrote {len(done)} cache entries in 900 s; the test needs 2 before the kill"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    finished = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert 2 <= len(finished) < 4
    # a half-written entry of the killed process (its temporary folder) is never read
    half = root / f".{'0' * 32}.{child.pid}.tmp"
    half.mkdir(exist_ok=True)
    (half / "logits.npy").write_bytes(b"\x93NUMPY truncated")
    forward = _forward(PointwiseTeacher().eval(), ["mix", "pool"])
    resumed, record = attach_teacher_targets(_cases(4), forward, _plan(), root)
    assert record["reused"] == len(finished) and record["computed"] == 4 - len(finished)
    assert not list(root.glob(".*.tmp"))
    fresh, _ = attach_teacher_targets(_cases(4), forward, _plan(), tmp_path / "fresh")
    for a, b in zip(resumed.cases, fresh.cases):
        assert np.array_equal(a.teacher.logits, b.teacher.logits)
        assert all(np.array_equal(x, y) for x, y in zip(a.teacher.features, b.teacher.features))


class CountingTeacher(nn.Module):
    """A tiny fully convolutional teacher that counts its forward passes and the voxels it sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv3d(1, 4, 3, padding=1)
        self.down = nn.Conv3d(4, 8, 3, stride=2, padding=1)
        self.head = nn.Conv3d(4, 2, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        s = torch.relu(self.stem(x))
        d = torch.relu(self.down(s))
        return self.head(s) + nn.functional.interpolate(d, size=s.shape[2:]).mean(1, keepdim=True)


def _teacher(tmp_path):
    from types import SimpleNamespace

    from ReCoKDLib.checkpoint import ModelCard

    card = ModelCard({"kind": "custom"}, CLASSES, [1.5, 1.5, 1.5], {"scheme": "zscore"}, [16, 16, 16],
                     tap_names=["stem", "down"])
    return SimpleNamespace(network=CountingTeacher(), card=card, sha256="counting-teacher", kind="entry_point")


@pytest.mark.parametrize("mode", ["cache", "live"])
def test_distill_runs_the_teacher_once_per_case_with_the_cache(tmp_path, mode):
    from ReCoKDLib.checkpoint import load_model_file
    from ReCoKDLib.engine import TrainConfig, distill

    teacher = _teacher(tmp_path)
    student = {"in_channels": 1, "num_classes": 2, "filters": [4, 8, 8],
               "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "deep_supervision": False}
    config = TrainConfig(patch_size=(16, 16, 16), batch_size=2, steps=6, num_val_cases=0, optimizer="adamw", lr=3e-3,
                         kd={"recokd": {"weight": 1.0}, "logit": {"weight": 1.0}}, kd_weight=1.0, kd_warmup_steps=0,
                         student_config=student, student_taps=["input_block", "downsamples.0"], ema_decay=0.0,
                         teacher_outputs=mode, checkpoint_every=3)
    result = distill(config, teacher, _cases(3), tmp_path / "run")
    probes = 1  # the pair's probe of the tap shapes
    if mode == "cache":
        assert teacher.network.calls == probes + 3  # one whole-volume pass per training case
    else:
        assert teacher.network.calls == probes + 6  # one per step
    card, _ = load_model_file(result.last_model)
    outputs = card.kd["teacher_outputs"]
    assert outputs["mode"] == mode
    if mode == "cache":
        assert outputs["exact"] and outputs["computed"] == 3 and outputs["bytes"] > 0
        assert outputs["taps"] == ["stem", "down"]
        assert (tmp_path / "run" / "teacher_cache").is_dir()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["train"]) == 6 and all(np.isfinite(h["total"]) for h in history["train"])


def test_teacher_passes_and_training_steps_flush_subnormal_floats(tmp_path):
    """Subnormal activations made an HD-BET pass 30x slower on the CPU: the cache's teacher passes
    and the engine's steps run with them flushed to zero, and the setting is restored afterwards."""
    seen = []

    def forward(x):
        seen.append(float(torch.tensor([1e-40]) * 1.0))  # 0.0 when subnormals are flushed
        return torch.zeros(1, 2, *x.shape[2:]), []

    attach_teacher_targets(_cases(1), forward, _plan(taps=(), strides=()), tmp_path)
    assert seen == [0.0]
    assert float(torch.tensor([1e-40]) * 1.0) != 0.0  # restored
    from ReCoKDLib.engine.parts import flush_denormals

    with flush_denormals():
        assert float(torch.tensor([1e-40]) * 1.0) == 0.0
        with flush_denormals():  # nested (a demo around the engine's own passes)
            pass
        assert float(torch.tensor([1e-40]) * 1.0) == 0.0  # the inner exit does not end the outer one
    assert float(torch.tensor([1e-40]) * 1.0) != 0.0
