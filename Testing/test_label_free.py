"""Label-free distillation: unlabelled cases train on the teacher's predictions; real labels win."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ReCoKDLib.checkpoint import ModelCard, save_model
from ReCoKDLib.data.io import Geometry, write_image
from ReCoKDLib.data.layout import Case
from ReCoKDLib.data.preprocess import preprocess_case
from ReCoKDLib.data.sampling import UNLABELLED, CaseArrays, CaseSet, PatchSampler, prepare_cases
from ReCoKDLib.engine import (
    TrainConfig,
    TrainingError,
    _DistillModule,
    build_seg_loss,
    distill,
    merge_pseudo_labels,
    pseudo_weighted_seg_loss,
    train_teacher,
)
from ReCoKDLib.losses.masks import class_balanced_region_masks
from ReCoKDLib.losses.recokd import region_mask_weights
from ReCoKDLib.networks import build_unet, preset

CLASSES = ["background", "blob"]
TINY = preset("tiny", num_classes=2)


def _volume(seed: int, shape=(16, 16, 16)):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 0.3, shape).astype(np.float32)
    label = np.zeros(shape, np.int16)
    lo = rng.integers(2, 6, 3)
    label[tuple(slice(a, a + 7) for a in lo)] = 1
    image[label == 1] += 2.0
    return image, label


@pytest.fixture()
def teacher_file(tmp_path):
    torch.manual_seed(0)
    net = build_unet(TINY)
    card = ModelCard(architecture={"kind": "dynunet", "config": TINY.to_dict()}, classes=CLASSES,
                     spacing=[1.0, 1.0, 1.0], normalization={"scheme": "zscore"}, patch_size=[16, 16, 16])
    return save_model(tmp_path / "teacher.pt", net.state_dict(), card)


def _case_files(tmp_path, n=3):
    cases = []
    for i in range(n):
        image, label = _volume(i)
        img = write_image(image, Geometry(), tmp_path / f"c{i}_0000.nii.gz")
        lab = write_image(label, Geometry(), tmp_path / f"c{i}.nii.gz")
        cases.append((img, lab))
    return cases


def test_merge_takes_teacher_argmax_only_for_unlabelled_samples():
    logits = torch.randn(2, 3, 4, 4, 4)
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4))
    labels[1] = UNLABELLED
    labels[1, 0, 0, 0, 0] = 0  # padding can add zeros to an unlabelled patch: still unlabelled
    merged, unlabelled = merge_pseudo_labels(labels, logits)
    assert unlabelled.tolist() == [False, True]
    torch.testing.assert_close(merged[0], labels[0])  # real labels take precedence
    torch.testing.assert_close(merged[1], logits[1:].argmax(1))
    first = labels[:1]
    same, none = merge_pseudo_labels(first, logits[:1])
    assert same is first and not none.any()


def test_label_free_region_masks_equal_masks_of_teacher_argmax():
    """ReCo-KD inside the engine module: with no labels its masks and loss are those of the teacher's argmax."""
    from ReCoKDLib.losses.registry import build_combined_kd_loss
    from ReCoKDLib.taps import DistillationPair

    torch.manual_seed(1)
    teacher, student = build_unet(TINY), build_unet(preset("tiny", num_classes=2, filters=(4, 8, 16)))
    taps = ["input_block", "downsamples.0"]
    pair = DistillationPair(teacher, student, taps, taps, (1, 16, 16, 16))
    kd = build_combined_kd_loss({"recokd": {"weight": 1.0}}, teacher_channels=pair.teacher_channels,
                                student_channels=pair.student_channels, num_classes=2)
    module = _DistillModule(pair, kd, 2).eval()
    images = torch.randn(2, 1, 16, 16, 16)
    unlabelled = torch.full((2, 1, 16, 16, 16), UNLABELLED, dtype=torch.long)
    with torch.no_grad():
        t_logits, _ = pair.teacher_forward(images)
        argmax = t_logits.argmax(1, keepdim=True)
        _, loss_free, _, (merged, flags) = module(images, unlabelled)
        _, loss_argmax, _, _ = module(images, argmax)
    assert flags.all()
    torch.testing.assert_close(merged, argmax)
    torch.testing.assert_close(loss_free, loss_argmax)
    for size in [(16, 16, 16), (8, 8, 8)]:
        for a, b in zip(region_mask_weights(merged, 2, size), region_mask_weights(argmax, 2, size)):
            torch.testing.assert_close(a, b)
    fg, bg = class_balanced_region_masks(merged, 2)
    assert float(bg.sum()) == pytest.approx(2.0)  # both samples have background with total weight 1


def test_labelled_case_uses_its_labels():
    torch.manual_seed(2)
    from ReCoKDLib.losses.registry import build_combined_kd_loss
    from ReCoKDLib.taps import DistillationPair

    teacher, student = build_unet(TINY), build_unet(TINY)
    pair = DistillationPair(teacher, student, ["input_block"], ["input_block"], (1, 16, 16, 16))
    kd = build_combined_kd_loss({"recokd": {"weight": 1.0}}, teacher_channels=pair.teacher_channels,
                                student_channels=pair.student_channels, num_classes=2)
    module = _DistillModule(pair, kd, 2).eval()
    labels = torch.from_numpy(_volume(3)[1]).long()[None, None]
    with torch.no_grad():
        _, _, _, (merged, flags) = module(torch.randn(1, 1, 16, 16, 16), labels)
    assert not flags.any()
    torch.testing.assert_close(merged, labels)


def test_pseudo_label_weight_scales_the_unlabelled_part():
    seg = build_seg_loss(1)
    heads = [torch.randn(2, 2, 8, 8, 8)]
    labels = torch.randint(0, 2, (2, 1, 8, 8, 8))
    flags = torch.tensor([False, True])
    full = pseudo_weighted_seg_loss(seg, heads, labels, flags, 1.0)
    labelled_only = pseudo_weighted_seg_loss(seg, heads, labels, flags, 0.0)
    torch.testing.assert_close(labelled_only, seg([heads[0][:1]], labels[:1]) * 0.5)
    assert not torch.isclose(full, labelled_only)
    zero = pseudo_weighted_seg_loss(seg, heads, labels, torch.tensor([True, True]), 0.0)
    assert float(zero) == 0.0


def test_prepare_cases_keeps_unlabelled_cases(tmp_path):
    files = _case_files(tmp_path, 2)
    cases = [Case("lab", [files[0][0]], files[0][1]), Case("free", [files[1][0]], None)]
    params = {"spacing": [1.0, 1.0, 1.0], "normalization": {"scheme": "zscore"}}
    with pytest.raises(ValueError, match="no label file"):
        prepare_cases(cases, CLASSES, preprocess_case, params)
    for _ in range(2):  # second pass: from the cache, the flag survives
        case_set = prepare_cases(cases, CLASSES, preprocess_case, params, tmp_path / "cache", allow_unlabelled=True)
        assert case_set.unlabelled_cases == ["free"]
        assert case_set.cases[0].labelled and not case_set.cases[1].labelled
        assert np.all(np.asarray(case_set.cases[1].label) == UNLABELLED)
    sampler = PatchSampler(CaseSet([case_set.cases[1]], CLASSES), (8, 8, 8), augmentation=None, seed=0)
    _, labels = sampler.batch(2)
    assert bool((labels == UNLABELLED).all())


def test_teacher_training_refuses_unlabelled_cases(tmp_path):
    image, _ = _volume(0)
    free = CaseArrays("free", image[None], np.full((1, *image.shape), UNLABELLED, np.int16))
    config = TrainConfig(patch_size=(16, 16, 16), steps=1, device="cpu", num_val_cases=0, network=TINY.to_dict())
    with pytest.raises(TrainingError, match="needs labels"):
        train_teacher(config, CaseSet([free], CLASSES), tmp_path / "t")


def test_label_free_distill_runs_and_resumes(teacher_file, tmp_path):
    images = []
    for i in range(2):
        image, label = _volume(i)
        images.append(CaseArrays(f"c{i}", image[None], np.full((1, *image.shape), UNLABELLED, np.int16)))
    image, label = _volume(5)
    images.append(CaseArrays("labelled", image[None], label[None]))  # partial labels: the held-out one
    case_set = CaseSet(images, CLASSES)
    config = TrainConfig(patch_size=(16, 16, 16), batch_size=2, steps=2, device="cpu", num_val_cases=1, val_every=2,
                         kd={"recokd": {"weight": 1.0}, "logit": {"weight": 1.0}}, kd_weight=1.0, kd_warmup_steps=0,
                         student_reduction=2, min_channels=4, checkpoint_every=1, ema_decay=0.0)
    first = distill(config, str(teacher_file), case_set, tmp_path / "run")
    assert first.step == 2 and first.last_model.exists() and first.metrics["cases"] == 1
    resumed = distill(config.replace(steps=3), str(teacher_file), case_set, tmp_path / "run", resume=True)
    assert resumed.step == 3
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert all(np.isfinite(h["seg"]) and np.isfinite(h["kd"]) for h in history["train"])


def test_cli_distill_from_images_only(teacher_file, tmp_path):
    from ReCoKDLib.cli import main

    files = _case_files(tmp_path, 2)
    folder = tmp_path / "images"
    folder.mkdir()
    for img, _ in files:
        (folder / img.name).write_bytes(img.read_bytes())
    out = tmp_path / "student"
    rc = main(["distill", str(teacher_file), "--images", str(folder), "--out", str(out), "--steps", "2",
               "--patch", "16,16,16", "--batch", "1", "--val-cases", "0", "--device", "cpu", "--reduction", "2",
               "--min-channels", "4", "--kd", "recokd:1,logit:1", "--pseudo-label-weight", "0.5",
               "--student-norm", "batch", "--progress", "none"])
    assert rc == 0 and (out / "model_last.pt").exists()
    card = json.loads((out / "model_last.json").read_text())
    assert card["role"] == "student" and sorted(card["provenance"]["cases"]) == ["c0", "c1"]
    assert card["architecture"]["config"]["norm"] == "batch"  # --student-norm: a fully convolutional student
    assert card["provenance"]["train_config"]["pseudo_label_weight"] == 0.5
    assert card["provenance"]["train_config"]["student_stem"] == "full"
    rc = main(["distill", str(teacher_file), "--images", str(folder), "--out", str(tmp_path / "stem"), "--steps", "1",
               "--patch", "16,16,16", "--student-stem", "strided", "--progress", "none"])
    assert rc == 2 and not (tmp_path / "stem" / "model_last.pt").exists()  # a 3-stage teacher has no stage to drop
    rc = main(["distill", str(teacher_file), "--images", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"),
               "--progress", "none"])
    assert rc == 2  # bad input: no images there


def test_cli_distill_no_labels_on_a_folder_without_label_files(teacher_file, tmp_path):
    """``--data FOLDER --no-labels`` reads the images of an nnU-Net folder that has no labelsTr/
    (and whose label table need not be the teacher's: labels are not read); without
    ``--no-labels`` the same folder is refused with the missing label named."""
    from ReCoKDLib.cli import main

    folder = tmp_path / "Dataset960_Unlabelled"
    (folder / "imagesTr").mkdir(parents=True)
    for img, _ in _case_files(tmp_path, 2):
        (folder / "imagesTr" / img.name).write_bytes(img.read_bytes())
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "file_ending": ".nii.gz",
                                                     "labels": {"background": 0, "a": 1, "b": 2}}))
    common = ["--steps", "2", "--patch", "16,16,16", "--batch", "1", "--val-cases", "0", "--device", "cpu",
              "--reduction", "2", "--min-channels", "4", "--progress", "none"]
    out = tmp_path / "student"
    assert main(["distill", str(teacher_file), "--data", str(folder), "--no-labels", "--out", str(out), *common]) == 0
    card = json.loads((out / "model_last.json").read_text())
    assert sorted(card["provenance"]["cases"]) == ["c0", "c1"] and card["classes"] == CLASSES
    assert main(["distill", str(teacher_file), "--data", str(folder), "--out", str(tmp_path / "x"), *common]) == 2
