"""Every registered KD method builds by name and trains a real tiny teacher/student pair (CPU, seconds).

Also: combining methods with weights, and parsing the CLI form ``"recokd:1,logit:0.5"``.
"""

from __future__ import annotations

import pytest
import torch

from ReCoKDLib import networks
from ReCoKDLib.losses import registry
from ReCoKDLib.losses.base import KDConfigError, KDOutput
from ReCoKDLib.losses.registry import KD_LOSSES, WeightedKDLoss, build_combined_kd_loss, build_kd_loss, parse_kd_spec
from ReCoKDLib.taps import DistillationPair

NUM_CLASSES = 3

#: Methods that read no feature level through the taps' adapters with their default options:
#: logit KD reads logits only; EMKD, FFD and CIRKD are channel-free (or own a projector) and read
#: the student's raw features. Every other method must train the adapters.
ADAPTER_FREE = {"logit", "emkd", "ffd", "cirkd"}


@pytest.fixture(scope="module")
def pair() -> DistillationPair:
    torch.manual_seed(0)
    teacher_cfg = networks.preset("tiny", num_classes=NUM_CLASSES)
    student_cfg = networks.derive_student_config(teacher_cfg, reduction=2, min_channels=4)
    return DistillationPair(
        networks.build_unet(teacher_cfg),
        networks.build_unet(student_cfg),
        networks.encoder_tap_names(teacher_cfg),
        networks.encoder_tap_names(student_cfg),
        input_shape=(1, 16, 16, 16),
    ).train()


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 1, 16, 16, 16, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (2, 1, 16, 16, 16), generator=generator)
    return images, labels


def _build(pair: DistillationPair, name: str, **options):
    return build_kd_loss(name, teacher_channels=pair.teacher_channels, student_channels=pair.student_channels,
                         num_classes=NUM_CLASSES, **options)


def _grad_total(params) -> float:
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


def _step(pair: DistillationPair, loss: torch.nn.Module, inputs) -> KDOutput:
    """One forward + backward; returns the KD output with gradients filled in."""
    pair.zero_grad(set_to_none=True)
    loss.zero_grad(set_to_none=True)
    images, labels = inputs
    _, batch = pair(images, labels, NUM_CLASSES)
    out = loss(batch)
    assert isinstance(out, KDOutput)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss), out.loss
    out.loss.backward()
    return out


def test_the_table_serves_the_issue_names():
    expected = {"recokd", "ms_sard", "ms_ca", "mskd", "ffd", "rgd", "logit", "fitnet", "cwd", "ifvd", "emkd", "cirkd"}
    assert set(KD_LOSSES) == expected
    assert registry.available_kd_losses() == list(KD_LOSSES)


@pytest.mark.parametrize("name", list(KD_LOSSES))
def test_every_method_builds_and_trains_the_student(pair, inputs, name):
    loss = _build(pair, name)
    out = _step(pair, loss, inputs)
    assert out.terms and all(not t.requires_grad and torch.isfinite(t) for t in out.terms.values())
    assert _grad_total(pair.student.parameters()) > 0, f"{name}: no gradient reached the student"
    assert all(p.grad is None for p in pair.teacher.parameters()), f"{name}: the teacher got gradients"
    adapter_grad = _grad_total(pair.adapters.parameters())
    if name in ADAPTER_FREE:
        assert adapter_grad == 0, f"{name} is documented as adapter-free but trained the adapters"
    else:
        assert adapter_grad > 0, f"{name}: no gradient reached the adapters"
    own = [p for p in loss.parameters() if p.requires_grad]
    if own:  # trainable parts of the loss itself (CIRKD projector, MS-CA context blocks)
        assert _grad_total(own) > 0, f"{name}: its own trainable parameters got no gradient"


@pytest.mark.parametrize("name", sorted(ADAPTER_FREE - {"logit"}))
def test_channel_free_methods_can_read_the_adapters_instead(pair, inputs, name):
    loss = _build(pair, name, student_features="adapted")
    _step(pair, loss, inputs)
    assert _grad_total(pair.adapters.parameters()) > 0


def test_cirkd_projector_is_trained(pair, inputs):
    loss = _build(pair, "cirkd")
    _step(pair, loss, inputs)
    assert len(loss.projectors) == len(pair.teacher_channels)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.projectors.parameters())


@pytest.mark.parametrize("name", [n for n in KD_LOSSES if n != "logit"])
def test_every_feature_method_returns_discrepancy_maps(pair, inputs, name):
    images, labels = inputs
    loss = _build(pair, name)
    with torch.no_grad():
        _, batch = pair(images, labels, NUM_CLASSES)
        out = loss(batch, return_maps=True)
    assert out.maps, f"{name} returned no maps"
    assert any(key.split("/")[1] == "discrepancy" for key in out.maps), sorted(out.maps)
    for key, value in out.maps.items():
        assert not value.requires_grad and value.dim() in (4, 5) and value.shape[0] == 2, key


# -------------------------------------------------------------------------------- building and combining


def test_unknown_option_is_rejected_naming_it_and_the_valid_ones():
    with pytest.raises(KDConfigError, match=r"temprature.*temperature"):
        build_kd_loss("logit", temprature=2.0)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(KDConfigError, match=r"Did you mean 'logit'\?"):
        build_kd_loss("logti")
    with pytest.raises(KDConfigError, match=r"Did you mean 'cirkd'\?"):
        parse_kd_spec("cirdk:0.5")


def test_parse_kd_spec_weights_and_errors():
    assert parse_kd_spec("fitnet") == {"fitnet": {"weight": 1.0}}
    assert parse_kd_spec(" mskd:1, logit:0.5 ") == {"mskd": {"weight": 1.0}, "logit": {"weight": 0.5}}
    with pytest.raises(KDConfigError, match=r"bad KD weight 'half'"):
        parse_kd_spec("logit:half")
    with pytest.raises(KDConfigError, match="no KD method"):
        parse_kd_spec(" , ")


def test_combined_loss_is_the_weighted_sum(pair, inputs):
    spec = {"fitnet": {"weight": 2.0}, "logit": {"weight": 0.5, "temperature": 4.0}, "ffd": {}}
    combined = build_combined_kd_loss(spec, teacher_channels=pair.teacher_channels,
                                      student_channels=pair.student_channels, num_classes=NUM_CLASSES)
    assert isinstance(combined, WeightedKDLoss) and str(combined) == "2*fitnet + 0.5*logit + 1*ffd"
    images, labels = inputs
    with torch.no_grad():
        _, batch = pair(images, labels, NUM_CLASSES)
        out = combined(batch, return_maps=True)
        parts = {name: loss(batch).loss for name, loss in combined.losses.items()}
    assert combined.losses["logit"].temperature == 4.0
    expected = 2.0 * parts["fitnet"] + 0.5 * parts["logit"] + parts["ffd"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.terms["fitnet"].item() == pytest.approx(2.0 * parts["fitnet"].item(), rel=1e-5)
    assert {"fitnet/0/mse", "logit/kl", "ffd/1/ffd"} <= set(out.terms)
    assert "fitnet/0/discrepancy" in out.maps and "logit/logits/kl" in out.maps
    # the parsed CLI form builds the same structure
    parsed = build_combined_kd_loss(parse_kd_spec("fitnet:2,logit:0.5"), teacher_channels=pair.teacher_channels,
                                    student_channels=pair.student_channels, num_classes=NUM_CLASSES)
    assert parsed.weights == {"fitnet": 2.0, "logit": 0.5}
    with pytest.raises(KDConfigError, match="at least one"):
        WeightedKDLoss({}, {})
