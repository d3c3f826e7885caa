"""Post-processing recorded in the model card: keep the largest connected component of a class
(HD-BET's own default, ``-pp 1`` in MIC-DKFZ/HD-BET ``HD_BET/hd_bet_cli.py``), applied by every
front end's ``segment_volume`` unless turned off, inherited by distilled students."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ReCoKDLib.checkpoint import ModelCard
from ReCoKDLib.commands.inference_options import inference_kwargs
from ReCoKDLib.data.io import Geometry
from ReCoKDLib.infer import segment_volume
from ReCoKDLib.models.base import LoadedModel
from ReCoKDLib.models.presets import TeacherPresetError, load_preset
from ReCoKDLib.postprocess import PostProcessingError, keep_largest_component, postprocess_labels, steps_for_card


def test_only_the_largest_component_of_each_named_class_survives():
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[0:3, 0:3, 0:3] = 1      # 27 voxels: kept
    labels[5, 7, 7] = 1            # a stray voxel: removed
    labels[4, 4, 4] = 1            # touches the next only diagonally: 26-connected to it
    labels[5, 5, 5] = 1
    labels[0:2, 6:8, 6:8] = 2      # class 2 is not named: untouched, two components stay
    labels[4:6, 0:2, 6:8] = 2
    out = keep_largest_component(labels, [1])
    assert out.dtype == labels.dtype and out.shape == labels.shape
    assert (out == 1).sum() == 27 and out[5, 7, 7] == 0 and out[4, 4, 4] == 0 and out[5, 5, 5] == 0
    np.testing.assert_array_equal(out == 2, labels == 2)
    assert labels[5, 7, 7] == 1  # the input is not changed
    # an absent class stays absent; one component is unchanged
    np.testing.assert_array_equal(keep_largest_component(out, [1, 3]), out)


def _largest_component_over_the_whole_volume(labels, class_ids):
    """The plain reference: int32 components over the whole volume, no bounding box."""
    from scipy import ndimage

    out = labels.copy()
    for class_id in class_ids:
        mask = out == class_id
        components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[mask & (components != sizes.argmax())] = 0
    return out


def test_the_box_and_uint16_components_give_the_whole_volume_answer_ties_included():
    rng = np.random.default_rng(0)
    for trial in range(20):  # random blobs away from the borders: boxes smaller than the volume, ties
        labels = np.zeros((20, 24, 28), np.uint8)
        labels[2:-3, 3:-2, 4:-1] = (rng.random((15, 19, 23)) < rng.uniform(0.05, 0.35)) * rng.integers(1, 4, (15, 19, 23))
        np.testing.assert_array_equal(keep_largest_component(labels, [1, 2]),
                                      _largest_component_over_the_whole_volume(labels, [1, 2]))
    # two equal components: the one met first in C order stays, whatever the box
    tie = np.zeros((9, 9, 9), np.uint8)
    tie[5, 6, 1:3] = 1
    tie[5, 2, 6:8] = 1
    kept = keep_largest_component(tie, [1])
    assert kept[5, 2, 6] == 1 and kept[5, 6, 1] == 0
    # more components than uint16 holds (67,600 isolated voxels): labelled as int32 instead
    many = np.zeros((7, 260, 260), np.uint8)
    many[::2, ::2, ::2] = 1
    many[0, 0, 1] = 1  # joins (0, 0, 0) and (0, 0, 2): the largest component, 3 voxels
    out = keep_largest_component(many, [1])
    assert int((out == 1).sum()) == 3 and (out[0, 0, :3] == 1).all()


def test_a_card_names_classes_by_name_or_id_and_mistakes_are_refused():
    classes = ["background", "brain", "skull"]
    assert steps_for_card({"keep_largest_component": ["brain", 2]}, classes) == {"keep_largest_component": [1, 2]}
    assert steps_for_card({}, classes) == {} and steps_for_card(None, classes) == {}
    for bad, match in (({"fill_holes": ["brain"]}, "unknown post-processing step"),
                       ({"keep_largest_component": ["liver"]}, "not a foreground class"),
                       ({"keep_largest_component": ["background"]}, "not a foreground class"),
                       ({"keep_largest_component": [3]}, "not a foreground class")):
        with pytest.raises(PostProcessingError, match=match):
            steps_for_card(bad, classes)
    labels = np.zeros((3, 3, 9), np.uint8)
    labels[1, 1, [0, 1, 2, 7]] = 1
    kept, info = postprocess_labels(labels, {"keep_largest_component": ["brain"]}, classes)
    assert info == {"keep_largest_component": {"brain": 1}} and kept.sum() == 3
    same, info = postprocess_labels(labels, {}, classes)
    assert same is labels and info == {}


class _BrightIsForeground(nn.Module):
    """Logits ``(B, 2, D, H, W)``: class 1 where the (normalised) image is above 0."""

    def forward(self, x):
        return torch.cat([-x[:, :1], x[:, :1]], dim=1) * 10.0


def _model(postprocessing):
    card = ModelCard(architecture={"kind": "test"}, classes=["background", "brain"], spacing=[1.0, 1.0, 1.0],
                     normalization={"scheme": "none"}, patch_size=[8, 8, 8], postprocessing=postprocessing)
    return LoadedModel(_BrightIsForeground().eval(), card, "recokd")


def test_segment_volume_applies_the_cards_post_processing_unless_turned_off():
    image = -np.ones((16, 16, 16), np.float32)
    image[2:10, 2:10, 2:10] = 1.0   # the brain
    image[13:15, 13:15, 13:15] = 1.0  # a blob apart from it
    geometry = Geometry((1.0, 1.0, 1.0))
    kw = dict(device="cpu", backend="torch", precision="fp32", window="patch", overlap=0.0)
    result = segment_volume(_model({"keep_largest_component": ["brain"]}), image, geometry, **kw)
    assert (result.labels == 1).sum() == 512 and result.labels[14, 14, 14] == 0
    assert result.info["postprocessing"] == {"keep_largest_component": {"brain": 8}}
    raw = segment_volume(_model({"keep_largest_component": ["brain"]}), image, geometry, postprocess=False, **kw)
    assert (raw.labels == 1).sum() == 520 and raw.info["postprocessing"] == {}
    plain = segment_volume(_model({}), image, geometry, **kw)
    np.testing.assert_array_equal(plain.labels, raw.labels)


def test_the_command_line_option_turns_it_off():
    import argparse

    from ReCoKDLib.commands.inference_options import add_inference_arguments

    parser = argparse.ArgumentParser()
    add_inference_arguments(parser)
    assert inference_kwargs(parser.parse_args([]))["postprocess"] is True
    assert inference_kwargs(parser.parse_args(["--no-postprocess"]))["postprocess"] is False


def test_hd_bet_preset_keeps_the_largest_brain_component_and_a_bad_preset_is_refused(tmp_path):
    assert load_preset("hd-bet").card().postprocessing == {"keep_largest_component": ["brain"]}
    record = {"format": "recokd-teacher-preset", "name": "x", "torchscript": "x.ts", "classes": ["background", "a"],
              "spacing": [1, 1, 1], "normalization": {"scheme": "zscore"}, "patch_size": [8, 8, 8],
              "postprocessing": {"keep_largest_component": ["brain"]}}
    path = tmp_path / "x.json"
    path.write_text(json.dumps(record))
    with pytest.raises(TeacherPresetError, match="postprocessing.*not a foreground class"):
        load_preset(path)


def test_a_hand_edited_card_with_a_bad_step_is_refused_when_read_not_after_inference(tmp_path):
    """The card inside a model file and its sidecar JSON are both checked when read (``ModelCard.from_dict``)."""
    from ReCoKDLib.checkpoint import CheckpointError, read_model_card, save_model

    path = save_model(tmp_path / "m.pt", {}, _model({"keep_largest_component": ["brain"]}).card)
    assert read_model_card(path).postprocessing == {"keep_largest_component": ["brain"]}
    sidecar = json.loads(path.with_suffix(".json").read_text())
    sidecar["postprocessing"] = {"keep_largest_component": ["skull"]}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="postprocessing: .*'skull' is not a foreground class"):
        read_model_card(path)
    bad = ModelCard.from_dict(json.loads(path.with_suffix(".json").read_text()) | {"postprocessing": {}})
    payload = torch.load(path, weights_only=True)
    payload["card"] = json.dumps(bad.to_dict() | {"postprocessing": {"fill_holes": ["brain"]}})
    torch.save(payload, path)
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="unknown post-processing step 'fill_holes'"):
        read_model_card(path)
