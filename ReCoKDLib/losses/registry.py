"""Build KD losses by name, alone or as a weighted sum.

The registry is an explicit table of ``name -> "module:Class"``, imported lazily: nothing is
registered by import side effects, and an unknown name is answered with the valid ones.

Every loss class takes keyword arguments only. The builder passes the shared context
(``teacher_channels``, ``student_channels``, ``num_classes``) only to classes whose ``__init__``
names it, then the method's own ``options``; an option the class does not take is an error.

Example:
    >>> loss = build_kd_loss("recokd", teacher_channels=[32, 64], student_channels=[8, 16],
    ...                      num_classes=3, stage_alpha=0.4)                 # doctest: +SKIP
    >>> both = build_combined_kd_loss({"recokd": {"weight": 1.0}, "logit": {"weight": 0.5, "temperature": 2.0}},
    ...                               teacher_channels=[32, 64], student_channels=[8, 16], num_classes=3)  # doctest: +SKIP
    >>> out = both(batch)          # KDOutput; out.terms has "recokd", "logit" and their own terms  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ReCoKDLib.choices import KD_METHODS
from ReCoKDLib.losses.base import KDBatch, KDConfigError, KDOutput

#: name -> (implementation, one-line description); the table itself (with the titles menus show)
#: is :data:`ReCoKDLib.choices.KD_METHODS`, readable without torch
KD_LOSSES: dict[str, tuple[str, str]] = {m.name: (m.implementation, m.description) for m in KD_METHODS}

_CONTEXT = ("teacher_channels", "student_channels", "num_classes")


def available_kd_losses() -> list[str]:
    """The registered names, in table order."""
    return list(KD_LOSSES)


def kd_loss_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``; an unknown name raises with the valid ones."""
    if name not in KD_LOSSES:
        close = difflib.get_close_matches(name, KD_LOSSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KDConfigError(f"unknown KD method {name!r}.{hint} Available: {', '.join(KD_LOSSES)}")
    module_name, class_name = KD_LOSSES[name][0].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_kd_loss(
    name: str,
    *,
    teacher_channels: Sequence[int] = (),
    student_channels: Sequence[int] = (),
    num_classes: int = 2,
    **options: Any,
) -> nn.Module:
    """Instantiate the KD loss ``name`` with its ``options``.

    Args:
        name: one of :data:`KD_LOSSES`.
        teacher_channels / student_channels: channels of each distilled level (for methods that
            own per-level modules such as context blocks or projectors).
        num_classes: ``K``, background included.
        **options: the method's own keyword arguments.
    """
    cls = kd_loss_class(name)
    params = inspect.signature(cls.__init__).parameters
    context = {"teacher_channels": list(teacher_channels), "student_channels": list(student_channels), "num_classes": num_classes}
    kwargs = {k: v for k, v in context.items() if k in params}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in options if k not in params and not accepts_any]
    if unknown:
        valid = [k for k, p in params.items() if k != "self" and k not in _CONTEXT and p.kind is not inspect.Parameter.VAR_KEYWORD]
        raise KDConfigError(f"KD method {name!r} takes no option(s) {unknown}; its options are {valid}")
    return cls(**kwargs, **options)


class WeightedKDLoss(nn.Module):
    """A weighted sum of KD losses: ``L = sum_i w_i * L_i``. Terms are submodules (``nn.ModuleDict``).

    ``forward`` returns a :class:`KDOutput` whose ``terms`` hold each method's weighted value under
    its name and each of its own terms as ``"<name>/<term>"``; maps likewise.
    """

    def __init__(self, losses: Mapping[str, nn.Module], weights: Mapping[str, float]) -> None:
        super().__init__()
        if not losses:
            raise KDConfigError("a combined KD loss needs at least one method")
        self.losses = nn.ModuleDict(dict(losses))
        self.weights = {name: float(weights.get(name, 1.0)) for name in losses}

    def forward(self, batch: KDBatch, return_maps: bool = False) -> KDOutput:
        total: torch.Tensor | None = None
        terms: dict[str, torch.Tensor] = {}
        maps: dict[str, torch.Tensor] = {}
        for name, loss in self.losses.items():
            out: KDOutput = loss(batch, return_maps=return_maps)
            weighted = self.weights[name] * out.loss
            total = weighted if total is None else total + weighted
            terms[name] = weighted.detach()
            terms.update({f"{name}/{k}": v for k, v in out.terms.items()})
            maps.update({f"{name}/{k}": v for k, v in out.maps.items()})
        assert total is not None
        return KDOutput(loss=total, terms=terms, maps=maps)

    def __str__(self) -> str:
        return " + ".join(f"{w:g}*{n}" for n, w in self.weights.items())


def build_combined_kd_loss(
    spec: Mapping[str, Mapping[str, Any]],
    *,
    teacher_channels: Sequence[int] = (),
    student_channels: Sequence[int] = (),
    num_classes: int = 2,
) -> WeightedKDLoss:
    """Build ``{name: {"weight": w, **options}}`` into one :class:`WeightedKDLoss`."""
    losses, weights = {}, {}
    for name, opts in spec.items():
        opts = dict(opts)
        weights[name] = float(opts.pop("weight", 1.0))
        losses[name] = build_kd_loss(
            name, teacher_channels=teacher_channels, student_channels=student_channels, num_classes=num_classes, **opts
        )
    return WeightedKDLoss(losses, weights)


def parse_kd_spec(text: str) -> dict[str, dict[str, Any]]:
    """Parse the CLI form ``"recokd"``, ``"recokd:1,logit:0.5"`` into ``{name: {"weight": w}}``."""
    spec: dict[str, dict[str, Any]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition(":")
        kd_loss_class(name)  # validate early, with the list of names
        try:
            spec[name] = {"weight": float(weight) if weight else 1.0}
        except ValueError:
            raise KDConfigError(f"bad KD weight {weight!r} for {name!r}; use NAME:WEIGHT, e.g. logit:0.5") from None
    if not spec:
        raise KDConfigError("no KD method given; e.g. --kd recokd or --kd recokd:1,logit:0.5")
    return spec
