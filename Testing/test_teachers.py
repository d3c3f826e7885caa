"""Loading teachers: ReCoKD files, TorchScript, entry points; unsafe pickles refused."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from ReCoKDLib.checkpoint import CheckpointError, ModelCard, save_model
from ReCoKDLib.networks import build_unet, preset
from ReCoKDLib.teachers import LoadedModel, ModelLoadError, is_torchscript_file, load_model

CLASSES = ["background", "liver", "spleen"]
UNET_KWARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8, 16], "strides": [2, 2]}


def _card(architecture=None, classes=CLASSES) -> ModelCard:
    return ModelCard(architecture=architecture or {}, classes=list(classes), spacing=[2.0, 1.5, 1.5],
                     normalization={"scheme": "zscore"}, patch_size=[16, 16, 16])


@pytest.fixture()
def tiny(tmp_path):
    torch.manual_seed(0)
    config = preset("tiny", num_classes=3)
    net = build_unet(config).eval()
    path = save_model(tmp_path / "tiny.pt", net.state_dict(), _card({"kind": "dynunet", "config": config.to_dict()}))
    return net, path


def test_recokd_model_file_round_trip(tiny):
    net, path = tiny
    model = load_model(path)
    assert isinstance(model, LoadedModel) and model.kind == "recokd" and model.feature_kd
    assert model.card.classes == CLASSES and not model.network.training
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), net(x))


def test_torchscript_with_sidecar_card(tiny, tmp_path):
    net, _ = tiny
    path = tmp_path / "scripted.pt"
    torch.jit.trace(net, torch.zeros(1, 1, 16, 16, 16)).save(str(path))
    assert is_torchscript_file(path)
    with pytest.raises(ModelLoadError, match="no model card"):
        load_model(path)
    (tmp_path / "scripted.json").write_text(_card().to_json())
    model = load_model(path)
    assert model.kind == "torchscript" and not model.feature_kd
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), net(x))


def test_entry_point_monai_unet(tmp_path):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(**UNET_KWARGS).eval()
    weights = tmp_path / "unet_weights.pt"
    torch.save({"state_dict": net.state_dict()}, weights)  # wrapped state dicts are unwrapped
    card = tmp_path / "card.json"
    card.write_text(_card().to_json())
    model = load_model(weights, entry_point="monai.networks.nets:UNet", kwargs=UNET_KWARGS, card=card)
    assert model.kind == "entry_point"
    assert model.card.architecture == {"kind": "entry_point", "factory": "monai.networks.nets:UNet", "kwargs": UNET_KWARGS}
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), net(x))
    # the same network saved as a ReCoKD model file rebuilds through the card's entry point
    path = save_model(tmp_path / "unet.pt", net.state_dict(), model.card)
    again = load_model(path)
    assert again.kind == "recokd"
    with torch.no_grad():
        torch.testing.assert_close(again.network(x), net(x))


def test_class_count_mismatch_is_an_error(tmp_path, tiny):
    from monai.networks.nets import UNet

    weights = tmp_path / "w.pt"
    torch.save(UNet(**UNET_KWARGS).state_dict(), weights)
    two_classes = _card(classes=["background", "liver"]).to_dict()
    with pytest.raises(ModelLoadError, match="outputs 3 channels but its card names 2 classes"):
        load_model(weights, entry_point="monai.networks.nets:UNet", kwargs=UNET_KWARGS, card=two_classes)
    _, path = tiny
    card = load_model(path).card
    card.classes = ["background", "liver"]
    with pytest.raises(ModelLoadError, match="3 output classes but its card names 2"):
        load_model(path, card=card)


def test_bad_entry_points_and_weights(tmp_path):
    from monai.networks.nets import UNet

    weights = tmp_path / "w.pt"
    torch.save(UNet(**UNET_KWARGS).state_dict(), weights)
    card = _card().to_dict()
    with pytest.raises(ModelLoadError, match="package.module:callable"):
        load_model(weights, entry_point="monai.networks.nets.UNet", kwargs={}, card=card)
    with pytest.raises(ModelLoadError, match="cannot import module"):
        load_model(weights, entry_point="no_such_pkg.mod:Net", kwargs={}, card=card)
    with pytest.raises(ModelLoadError, match="has no attribute"):
        load_model(weights, entry_point="monai.networks.nets:NoSuchNet", kwargs={}, card=card)
    wider = dict(UNET_KWARGS, channels=[8, 16, 32])
    with pytest.raises(ModelLoadError, match="do not fit the network"):
        load_model(weights, entry_point="monai.networks.nets:UNet", kwargs=wider, card=card)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "plain.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "plain.pt")


class _Malicious:
    """Unpickling this would create ``marker`` (``builtins.open(marker, "w")``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.mark.parametrize("as_entry_point", [False, True])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, as_entry_point):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "recokd-model", "format_version": 1, "card": _card().to_json(),
                "state_dict": {"weight": _Malicious(marker)}}, path)
    assert not marker.exists()  # saving did not run it
    (tmp_path / "evil.json").write_text(_card().to_json())
    kwargs = {"entry_point": "monai.networks.nets:UNet", "kwargs": UNET_KWARGS} if as_entry_point else {}
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(path, **kwargs)
    assert not marker.exists()


def test_card_from_json_file_is_validated(tmp_path):
    from monai.networks.nets import UNet

    weights = tmp_path / "w.pt"
    torch.save(UNet(**UNET_KWARGS).state_dict(), weights)
    (tmp_path / "bad.json").write_text(json.dumps({"classes": CLASSES}))
    with pytest.raises(CheckpointError, match="model card lacks"):
        load_model(weights, entry_point="monai.networks.nets:UNet", kwargs=UNET_KWARGS, card=tmp_path / "bad.json")
