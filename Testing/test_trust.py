"""A model file never chooses code to run (issue 18, security).

A ReCoKD model file's card, a teacher-preset JSON file and the package that holds a preset's
weights can all *name* Python code. These tests craft such files with callables that would
create a file (``builtins:open`` in write mode, ``subprocess:run`` spawning ``touch``) and check
that the file never appears, that the message names the entry point and how to trust it, and
that an explicit, by-name trust (``--trust-entry-point``) is the only way in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ReCoKDLib.checkpoint import ModelCard, save_model
from ReCoKDLib.teachers import load_model
from ReCoKDLib.trust import UntrustedCodeError, is_allow_listed, resolve_entry_point, trusted_entry_points

CARD = dict(classes=["background", "organ"], spacing=[2.0, 2.0, 2.0], normalization={"scheme": "zscore"},
            patch_size=[8, 8, 8])


def _crafted_model(tmp_path: Path, factory: str, kwargs: dict) -> Path:
    """A ReCoKD model file whose card says ``{"kind": "entry_point", "factory": ..., "kwargs": ...}``."""
    card = ModelCard(architecture={"kind": "entry_point", "factory": factory, "kwargs": kwargs}, **CARD)
    return save_model(tmp_path / "downloaded.pt", {"w": torch.zeros(1)}, card)


def _file_creating_calls(marker: Path) -> list[tuple[str, dict]]:
    return [
        ("builtins:open", {"file": str(marker), "mode": "w"}),
        ("subprocess:run", {"args": ["touch", str(marker)]}),
        ("pathlib:Path.touch", {"self": str(marker)}),
    ]


@pytest.mark.parametrize("index", range(3))
def test_a_model_card_naming_a_callable_runs_nothing(tmp_path, index):
    marker = tmp_path / "pwned"
    factory, kwargs = _file_creating_calls(marker)[index]
    model = _crafted_model(tmp_path, factory, kwargs)
    with pytest.raises(UntrustedCodeError) as info:
        load_model(model)
    assert not marker.exists(), "loading a model file ran the code its card names"
    message = str(info.value)
    assert factory in message and "--trust-entry-point" in message and str(model) in message
    assert info.value.entry_point == factory


def test_the_cli_refuses_the_crafted_file_with_exit_code_2(tmp_path):
    marker = tmp_path / "pwned"
    model = _crafted_model(tmp_path, "subprocess:run", {"args": ["touch", str(marker)]})
    image = tmp_path / "ct.nii.gz"
    from ReCoKDLib.data.io import write_image

    write_image(np.zeros((8, 8, 8), np.float32), _geometry(), image)
    run = subprocess.run([sys.executable, "-m", "ReCoKDLib", "segment", str(model), str(image), str(tmp_path / "seg.nii.gz"),
                          "--progress", "none"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert not marker.exists()
    assert "subprocess:run" in run.stderr and "--trust-entry-point" in run.stderr
    assert not (tmp_path / "seg.nii.gz").exists()


@pytest.mark.parametrize("spec", [
    "monai.networks.nets:UNet.__init__",                 # attribute paths never climb out of the allow-list
    "ReCoKDLib.networks:torch",                          # a module, not a network class
    "ReCoKDLib.networks:build_unet",                     # a function of an allowed module, not an nn.Module class
    "monai.networks.nets:FlexibleUNet",                  # MONAI, but may download pretrained backbones
    "monai.networks.nets:_private",
    "os:system",
])
def test_only_network_classes_of_the_allow_list_pass_unasked(spec):
    with pytest.raises(UntrustedCodeError):
        resolve_entry_point(spec, source="a test card")


def test_allow_listed_networks_load_from_a_card_without_asking(tmp_path):
    from monai.networks.nets import UNet

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}
    card = ModelCard(architecture={"kind": "entry_point", "factory": "monai.networks.nets:UNet", "kwargs": kwargs}, **CARD)
    path = save_model(tmp_path / "unet.pt", UNet(**kwargs).state_dict(), card)
    assert is_allow_listed("monai.networks.nets:UNet")
    assert type(load_model(path).network).__name__ == "UNet"


def test_trust_by_name_is_the_only_way_in(tmp_path):
    """``torch.nn:Conv3d`` is harmless but not allow-listed: refused, then accepted when trusted by name."""
    kwargs = {"in_channels": 1, "out_channels": 2, "kernel_size": 1}
    card = ModelCard(architecture={"kind": "entry_point", "factory": "torch.nn:Conv3d", "kwargs": kwargs}, **CARD)
    path = save_model(tmp_path / "conv.pt", torch.nn.Conv3d(**kwargs).state_dict(), card)
    with pytest.raises(UntrustedCodeError, match="torch.nn:Conv3d"):
        load_model(path)
    with pytest.raises(UntrustedCodeError):  # trusting another name does not trust this one
        load_model(path, trust_entry_points=["torch.nn:Conv2d"])
    assert isinstance(load_model(path, trust_entry_points=["torch.nn:Conv3d"]).network, torch.nn.Conv3d)
    with trusted_entry_points(["torch.nn:Conv3d"]):  # what recokd's --trust-entry-point does
        assert isinstance(load_model(path).network, torch.nn.Conv3d)
    with pytest.raises(UntrustedCodeError):  # and only inside the block
        load_model(path)


def test_the_cli_flag_trusts_by_name(tmp_path):
    kwargs = {"in_channels": 1, "out_channels": 2, "kernel_size": 1}
    card = ModelCard(architecture={"kind": "entry_point", "factory": "torch.nn:Conv3d", "kwargs": kwargs}, **CARD)
    model = save_model(tmp_path / "conv.pt", torch.nn.Conv3d(**kwargs).state_dict(), card)
    from ReCoKDLib.cli import main
    from ReCoKDLib.data.io import read_image, write_image

    image = tmp_path / "ct.nii.gz"
    geometry = _geometry()
    write_image(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32), geometry, image)
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(model), str(image), str(out), "--progress", "none"]) == 2 and not out.exists()
    assert main(["segment", str(model), str(image), str(out), "--progress", "none",
                 "--trust-entry-point", "torch.nn:Conv3d"]) == 0
    labels, _ = read_image(out)
    assert labels.shape[-3:] == (8, 8, 8)


def test_the_json_error_event_names_the_refused_entry_point(tmp_path, capsys):
    """``--progress json``: the ``error`` event of a refused entry point carries ``entry_point`` and
    ``entry_point_source`` (front ends such as the Slicer panel ask about that exact name)."""
    from ReCoKDLib.cli import main
    from ReCoKDLib.data.io import write_image
    from ReCoKDLib.trust import error_fields

    model = _crafted_model(tmp_path, "subprocess:run", {"args": ["touch", str(tmp_path / "pwned")]})
    image = tmp_path / "ct.nii.gz"
    write_image(np.zeros((8, 8, 8), np.float32), _geometry(), image)
    assert main(["segment", str(model), str(image), str(tmp_path / "seg.nii.gz"), "--progress", "json"]) == 2
    errors = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"error"' in line]
    assert len(errors) == 1 and errors[0]["entry_point"] == "subprocess:run"
    assert errors[0]["entry_point_source"] == f"the model card of {model}"
    assert not (tmp_path / "pwned").exists()
    assert error_fields(ValueError("a bad input")) == {}


def _geometry():
    from ReCoKDLib.data.io import Geometry

    return Geometry(spacing=(2.0, 2.0, 2.0))


def _preset_file(tmp_path: Path, **changes) -> Path:
    from monai.networks.nets import UNet

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}
    torch.save(UNet(**kwargs).state_dict(), tmp_path / "w.pt")
    data = {"format": "recokd-teacher-preset", "name": "downloaded", "entry_point": "monai.networks.nets:UNet",
            "kwargs": kwargs, "weights": "w.pt", **CARD}
    data.update(changes)
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(data))
    return path


def test_a_preset_file_naming_code_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    assert load_model(_preset_file(tmp_path)).card.classes == CARD["classes"]  # allow-listed: fine
    for changes in ({"entry_point": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}},
                    {"eval_hook": {"factory": "subprocess:run", "args": [["touch", str(marker)]]}},
                    {"builtin": True, "entry_point": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}}):
        with pytest.raises((UntrustedCodeError, ValueError)) as info:
            load_model(_preset_file(tmp_path, **changes))
        assert not marker.exists()
        assert "subprocess:run" in str(info.value) or "unknown fields" in str(info.value)


def test_a_preset_file_cannot_make_recokd_import_a_package_for_its_weights(tmp_path, monkeypatch):
    """``{"package": P, "path": R}`` is located with ``find_spec``: the package's code never runs."""
    marker = tmp_path / "pwned"
    package = tmp_path / "site" / "evilpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ValueError, match="does not exist"):
        load_model(_preset_file(tmp_path, weights={"package": "evilpkg", "path": "w.pt"}))
    assert "evilpkg" not in sys.modules and not marker.exists()


def test_builtin_presets_stay_trusted():
    from ReCoKDLib.teacher_presets import load_preset

    assert load_preset("preset:hd-bet").builtin
