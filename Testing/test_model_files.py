"""What a user is told about a file that is not a model, and what the model card holds.

A ``.pt`` of random bytes, of text, an empty one or a zip archive that is not a PyTorch file is
"not a model file" (with what it is instead); only a real pickle that names code is refused as
needing arbitrary code. Old cards (no ``colors``) still load.
"""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch

from ReCoKDLib import checkpoint
from ReCoKDLib.checkpoint import (CheckpointError, ModelCard, NotAModelFileError, UnsafeCheckpointError,
                                  load_model_file, not_a_torch_file_reason)


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def _not_models(folder):
    folder.mkdir(exist_ok=True)
    (folder / "random.pt").write_bytes(bytes(range(256)) * 8)
    (folder / "text.pt").write_text("these are my notes, saved as .pt by mistake\n" * 4)
    (folder / "empty.pt").write_bytes(b"")
    with zipfile.ZipFile(folder / "archive.pt", "w") as archive:
        archive.writestr("readme.txt", "not torch")
    return {
        "random.pt": "neither a PyTorch archive (zip) nor a pickle",
        "text.pt": "it is a text file (it starts with 'these are my notes",
        "empty.pt": "the file is empty",
        "archive.pt": "zip archive but not a PyTorch file (no <name>/data.pkl inside; it holds readme.txt)",
    }


def test_bytes_that_are_not_a_torch_file_are_named_as_such(tmp_path):
    for name, reason in _not_models(tmp_path).items():
        assert reason in not_a_torch_file_reason(tmp_path / name), name
        with pytest.raises(NotAModelFileError) as info:
            load_model_file(tmp_path / name)
        message = str(info.value)
        assert f"{tmp_path / name} is not a model file" in message and reason in message, message
        assert "arbitrary code" not in message and not isinstance(info.value, UnsafeCheckpointError)


def test_real_torch_files_pass_the_sniff_and_code_is_still_refused(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "state.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.ts")
    for name in ("state.pt", "legacy.pt", "scripted.ts"):
        assert not_a_torch_file_reason(tmp_path / name) == "", name
    assert torch.equal(checkpoint.safe_torch_load(tmp_path / "legacy.pt")["w"], torch.ones(2))
    torch.save({"x": _RunsCode()}, tmp_path / "code.pt")
    with pytest.raises(UnsafeCheckpointError, match="only arbitrary code could rebuild"):
        checkpoint.safe_torch_load(tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="is not a ReCoKD model file"):
        load_model_file(tmp_path / "state.pt")


def test_a_truncated_torch_archive_is_corrupt_not_unsafe(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        checkpoint.safe_torch_load(tmp_path / "cut.pt")
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_card_colors_round_trip_and_old_cards_load(tmp_path):
    base = dict(architecture={"kind": "dynunet", "config": {}}, classes=["background", "liver"], spacing=[1, 1, 1],
                normalization={"scheme": "zscore"}, patch_size=[8, 8, 8])
    old = ModelCard.from_dict(base)
    assert old.colors == []
    card = ModelCard(**base, colors=[[0, 0, 0], [0.9, 0.5, 0.5]])
    assert ModelCard.from_dict(json.loads(card.to_json())).colors == [[0, 0, 0], [0.9, 0.5, 0.5]]


def test_card_inference_overlap_round_trips_and_bad_records_are_refused():
    base = dict(architecture={"kind": "dynunet", "config": {}}, classes=["background", "brain"], spacing=[1, 1, 1],
                normalization={"scheme": "zscore"}, patch_size=[8, 8, 8])
    assert ModelCard.from_dict(base).inference == {}  # cards written before the field: the defaults
    card = ModelCard(**base, inference={"overlap": 0.25})
    assert ModelCard.from_dict(json.loads(card.to_json())).inference == {"overlap": 0.25}
    for bad, reason in (({"overlap": 1.0}, r"\[0, 1\)"), ({"overlap": -0.1}, r"\[0, 1\)"),
                        ({"overlap": "0.25"}, r"\[0, 1\)"), ({"overlap": True}, r"\[0, 1\)"),
                        ({"step": 0.5}, "unknown keys \\['step'\\]"), ([0.25], "must be an object")):
        with pytest.raises(CheckpointError, match=reason):
            ModelCard.from_dict({**base, "inference": bad})

