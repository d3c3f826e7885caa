"""The sliding-window overlap chosen by measured agreement (ReCoKDLib.overlap): the rule, the
measurement through segment_volume, and the card it writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ReCoKDLib.checkpoint import ModelCard, load_model_file, read_model_card, save_model
from ReCoKDLib.data.io import Geometry
from ReCoKDLib.infer import segment_volume
from ReCoKDLib.models.loading import load_model
from ReCoKDLib.networks import build_unet, preset
from ReCoKDLib.overlap import CANDIDATES, OverlapTrial, choose_overlap, label_dice, measure_overlaps, write_overlap


def _trial(overlap, dice, windows):
    return OverlapTrial(overlap, dice, {"v": dice}, windows, 1.0)


def test_the_fewest_windows_within_the_tolerance_of_the_best_dice_win():
    trials = [_trial(0.5, 0.980, 36), _trial(0.25, 0.979, 27), _trial(0.1, 0.976, 12), _trial(0.0, 0.970, 12)]
    assert choose_overlap(trials, tolerance=0.005).overlap == 0.1  # 0.0 has as few windows but is out of tolerance
    assert choose_overlap(trials, tolerance=0.0).overlap == 0.5
    assert choose_overlap(trials, tolerance=0.002).overlap == 0.25
    assert choose_overlap(trials, tolerance=0.02).overlap == 0.1  # same windows as 0.0: the higher Dice
    with pytest.raises(ValueError, match="no overlap"):
        choose_overlap([])
    with pytest.raises(ValueError, match="tolerance"):
        choose_overlap(trials, tolerance=-0.1)


def test_label_dice_is_the_mean_over_foreground_classes_present():
    reference = np.zeros((4, 4, 4), np.uint8)
    reference[:2] = 1
    prediction = reference.copy()
    prediction[0] = 2  # class 1: 16 of 32 voxels kept; class 2 only in the prediction
    assert label_dice(prediction, reference, 3) == pytest.approx((2 * 16 / (16 + 32) + 0.0) / 2)
    assert label_dice(reference, reference, 3) == 1.0
    assert label_dice(np.zeros_like(reference), np.zeros_like(reference), 3) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        label_dice(reference, reference[:2], 3)


def _model_file(folder):
    torch.manual_seed(0)
    config = preset("tiny", num_classes=3)
    network = build_unet(config)
    with torch.no_grad():  # decided classes, as in test_backends
        for p in network.parameters():
            p.mul_(3.0)
    card = ModelCard(architecture={"kind": "dynunet", "config": config.to_dict()}, classes=["bg", "a", "b"],
                     spacing=[2.0, 1.5, 1.5], normalization={"scheme": "zscore"}, patch_size=[16, 16, 16],
                     role="student")
    return save_model(folder / "student.pt", network.state_dict(), card)


def test_measure_then_write_the_choice_into_a_copy_of_the_model(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.normal(0, 1, (30, 40, 36)).astype(np.float32)
    image[8:20, 10:30, 10:25] += 3.0
    geometry = Geometry((1.3, 1.1, 2.2), (2.0, -3.0, 5.0), tuple(np.eye(3).ravel()))
    source = _model_file(tmp_path)
    model = load_model(source)
    # the reference: the model itself at overlap 0.5, so that candidate agrees exactly
    torch_fp32 = {"device": "cpu", "backend": "torch", "precision": "fp32"}
    reference = segment_volume(model, image, geometry, overlap=0.5, **torch_fp32).labels
    trials = measure_overlaps(model, [("v", image, geometry)], [reference], **torch_fp32)
    assert [t.overlap for t in trials] == list(CANDIDATES)
    assert trials[0].dice == 1.0 and trials[0].dice_per_volume == {"v": 1.0}
    windows = [t.windows for t in trials]
    assert windows == sorted(windows, reverse=True) and windows[0] > windows[-1] >= 1
    assert all(0.0 <= t.dice <= 1.0 for t in trials)

    chosen = choose_overlap(trials, tolerance=1.0)  # everything eligible: the fewest windows
    assert chosen.windows == min(windows)
    out = write_overlap(source, tmp_path / "chosen.pt", trials, chosen, 1.0, reference="itself at 0.5")
    card = read_model_card(out)
    assert card.inference == {"overlap": chosen.overlap}
    record = card.metrics["overlap_choice"]
    assert record["chosen"] == chosen.overlap and record["reference"] == "itself at 0.5"
    assert [t["windows"] for t in record["trials"]] == windows and len(record["model_sha256"]) == 64
    before, after = load_model_file(source)[1], load_model_file(out)[1]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # recokd segment then uses the chosen overlap without being told
    written = load_model(out)
    result = segment_volume(written, image, geometry, **torch_fp32)
    assert result.info["overlap"] == chosen.overlap
    np.testing.assert_array_equal(result.labels, segment_volume(model, image, geometry, overlap=chosen.overlap,
                                                                **torch_fp32).labels)


def test_measure_refuses_a_missing_reference(tmp_path):
    model = load_model(_model_file(tmp_path))
    with pytest.raises(ValueError, match="one reference per volume"):
        measure_overlaps(model, [("v", np.zeros((8, 8, 8), np.float32), None)], [])


# ---------------------------------------------------------------------------------------------
# recokd tune-overlap


def _cli_inputs(folder):
    from ReCoKDLib.data.io import write_image

    rng = np.random.default_rng(5)
    image = rng.normal(0, 1, (30, 40, 36)).astype(np.float32)
    image[8:20, 10:30, 10:25] += 3.0
    geometry = Geometry((1.3, 1.1, 2.2), (2.0, -3.0, 5.0), tuple(np.eye(3).ravel()))
    write_image(image, geometry, folder / "img_0000.nii.gz")
    return folder / "img_0000.nii.gz", image, geometry


FAST = ["--backend", "torch", "--precision", "fp32", "--progress", "json"]


def test_tune_overlap_against_a_reference_model_writes_a_tuned_copy(tmp_path):
    from ReCoKDLib.cli import main

    image_path, image, geometry = _cli_inputs(tmp_path)
    student = _model_file(tmp_path)
    out = tmp_path / "tuned.pt"
    # the model as its own reference: overlap 0.5 agrees exactly, and a tolerance of 1 makes the fewest windows win
    assert main(["tune-overlap", str(student), "--reference", str(student), "--images", str(image_path),
                 "--out", str(out), "--tolerance", "1", *FAST]) == 0
    record = read_model_card(out).metrics["overlap_choice"]
    assert record["trials"][0]["overlap"] == 0.5 and record["trials"][0]["dice"] == 1.0
    fewest = min(t["windows"] for t in record["trials"])
    assert read_model_card(out).inference["overlap"] == record["chosen"]
    assert next(t for t in record["trials"] if t["overlap"] == record["chosen"])["windows"] == fewest
    assert record["reference"].startswith("the segmentation by") and read_model_card(student).inference == {}
    # --candidates and a zero tolerance: the best Dice (overlap 0.5 against itself) is kept
    assert main(["tune-overlap", str(student), "--reference", str(student), "--images", str(image_path),
                 "--out", str(out), "--tolerance", "0", "--candidates", "0.5,0", *FAST]) == 0
    assert read_model_card(out).inference == {"overlap": 0.5}


def test_tune_overlap_against_label_maps_and_its_refusals(tmp_path, capsys):
    from ReCoKDLib.cli import main
    from ReCoKDLib.data.io import write_image

    image_path, image, geometry = _cli_inputs(tmp_path)
    student = _model_file(tmp_path)
    label = np.zeros(image.shape, np.uint8)
    label[8:20, 10:30, 10:25] = 1
    write_image(label, geometry, tmp_path / "label.nii.gz")
    out = tmp_path / "tuned.pt"
    assert main(["tune-overlap", str(student), "--images", str(image_path), "--labels", str(tmp_path / "label.nii.gz"),
                 "--out", str(out), *FAST]) == 0
    assert read_model_card(out).metrics["overlap_choice"]["reference"] == "label maps of 1 image(s)"
    capsys.readouterr()

    def refused(*argv) -> str:
        assert main(["tune-overlap", str(student), "--images", str(image_path), *argv, *FAST]) == 2
        captured = capsys.readouterr()
        return captured.err + captured.out

    moved = Geometry((1.3, 1.1, 2.2), (9.0, -3.0, 5.0), tuple(np.eye(3).ravel()))
    write_image(label, moved, tmp_path / "moved.nii.gz")
    assert "not on the same voxel grid" in refused("--labels", str(tmp_path / "moved.nii.gz"), "--out", str(out))
    write_image((label * 7).astype(np.uint8), geometry, tmp_path / "seven.nii.gz")
    assert "not class ids of the model" in refused("--labels", str(tmp_path / "seven.nii.gz"), "--out", str(out))
    assert "give one per image" in refused("--labels", str(tmp_path / "label.nii.gz"), str(tmp_path / "label.nii.gz"),
                                           "--out", str(out))
    other = save_model(tmp_path / "other.pt", *reversed(load_model_file(student)))  # same weights ...
    card = read_model_card(other)
    card.classes = ["bg", "liver", "spleen"]  # ... other classes
    save_model(other, load_model_file(student)[1], card)
    assert "are not the model's" in refused("--reference", str(other), "--out", str(out))
    assert "must not be MODEL itself" in refused("--labels", str(tmp_path / "label.nii.gz"), "--out", str(student))
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(tmp_path / "graph.ts"))
    assert main(["tune-overlap", str(tmp_path / "graph.ts"), "--images", str(image_path), "--labels",
                 str(tmp_path / "label.nii.gz"), "--out", str(out), *FAST]) == 2
    assert "is TorchScript: tune-overlap writes the chosen overlap into the card of a ReCoKD model file" in \
        capsys.readouterr().err
