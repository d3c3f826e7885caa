"""Teacher and student networks: an nnU-Net-like 3D U-Net (MONAI ``DynUNet``) and its thin copies.

The student is derived from any teacher configuration by dividing every stage width by ``2**t``
with a floor ``min_channels`` ("no custom student design", ReCo-KD §2.2): depth, strides, kernel
sizes and deep supervision are kept, so the student sees the same patches at the same scales.

Shapes: input ``(B, in_channels, D, H, W)`` with each spatial size divisible by the product of the
strides along that axis; output ``(B, K, D, H, W)`` logits in eval mode, and in training mode with
deep supervision MONAI's stacked ``(B, 1 + S, K, D, H, W)`` (see :func:`split_deep_supervision`).
A network whose first stage is strided (a *strided stem*: no convolution at full resolution) gives
the same shapes: its logits are upsampled to the input's size (:func:`upsample_logits`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

Triple = tuple[int, int, int]


class NetworkConfigError(ValueError):
    """A network configuration is inconsistent (lengths, strides, widths)."""


#: :attr:`UNetConfig.norm` -> MONAI's normalisation layer (``DynUNet``'s ``norm_name``)
NORMS: dict[str, tuple[str, dict[str, Any]]] = {
    "instance": ("INSTANCE", {"affine": True}),
    "batch": ("BATCH", {"affine": True}),
}


def _triple(value: int | Sequence[int], what: str) -> Triple:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise NetworkConfigError(f"{what} must be an int or 3 ints, got {value}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a 3D U-Net (MONAI ``DynUNet``), serialisable to JSON for model cards.

    Attributes:
        in_channels: image channels (1 for CT or a single MR sequence).
        num_classes: output channels ``K``, background included.
        filters: width of each stage, from full resolution to the bottleneck.
        strides: per stage, the downsampling stride, axis order ``(D, H, W)``. The first is
            normally ``(1, 1, 1)``; a strided first stage (a *strided stem*, e.g. ``(2, 2, 2)``)
            runs no convolution at full resolution and upsamples its logits trilinearly to the
            input's size (:func:`build_unet`): several times faster on a CPU, at the cost of
            boundary detail finer than that stride.
        kernel_sizes: per stage, the convolution kernel size.
        deep_supervision: add auxiliary heads on the decoder (training only).
        deep_supr_num: how many auxiliary heads (at most ``len(filters) - 2``).
        res_block: residual blocks instead of plain conv blocks.
        norm: ``"instance"`` (nnU-Net's, the default) or ``"batch"``. Instance norm takes its statistics
            over the window, so such a network must segment with its training patch as window
            (:mod:`ReCoKDLib.models.window`); batch norm uses fixed running statistics at inference,
            which makes the network fully convolutional: a student with it segments a whole scan in
            the largest window memory allows, without the overlapping windows' repeated work.
    """

    in_channels: int = 1
    num_classes: int = 2
    filters: tuple[int, ...] = (32, 64, 128, 256, 320)
    strides: tuple[Triple, ...] = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    kernel_sizes: tuple[Triple, ...] = field(default=())
    deep_supervision: bool = True
    deep_supr_num: int = 2
    res_block: bool = False
    norm: str = "instance"

    def __post_init__(self) -> None:
        n = len(self.filters)
        if self.norm not in NORMS:
            raise NetworkConfigError(f"norm must be one of {list(NORMS)}, got {self.norm!r}")
        object.__setattr__(self, "filters", tuple(int(f) for f in self.filters))
        object.__setattr__(self, "strides", tuple(_triple(s, "stride") for s in self.strides))
        kernels = self.kernel_sizes or tuple((3, 3, 3) for _ in range(n))
        object.__setattr__(self, "kernel_sizes", tuple(_triple(k, "kernel size") for k in kernels))
        if n < 3:
            raise NetworkConfigError(f"a U-Net needs at least 3 stages, got filters={self.filters}")
        if len(self.strides) != n or len(self.kernel_sizes) != n:
            raise NetworkConfigError(
                f"filters, strides and kernel_sizes need one entry per stage: "
                f"{n} filters, {len(self.strides)} strides, {len(self.kernel_sizes)} kernel sizes"
            )
        if any(f < 1 for f in self.filters):
            raise NetworkConfigError(f"every stage needs at least one channel, got filters={self.filters}")
        if self.in_channels < 1 or self.num_classes < 2:
            raise NetworkConfigError(
                f"in_channels must be >= 1 and num_classes (background included) >= 2, "
                f"got {self.in_channels} and {self.num_classes}"
            )
        if self.deep_supervision and not 1 <= self.deep_supr_num <= n - 2:
            raise NetworkConfigError(f"deep_supr_num must be in [1, {n - 2}] for {n} stages, got {self.deep_supr_num}")

    @property
    def num_stages(self) -> int:
        return len(self.filters)

    @property
    def strided_stem(self) -> bool:
        """The first stage is strided: the decoder ends below full resolution (logits upsampled)."""
        return self.strides[0] != (1, 1, 1)

    @property
    def divisor(self) -> Triple:
        """Each spatial size of an input patch must be a multiple of this, axis order (D, H, W)."""
        return tuple(math.prod(s[a] for s in self.strides) for a in range(3))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["strides"] = [list(s) for s in self.strides]
        d["kernel_sizes"] = [list(k) for k in self.kernel_sizes]
        d["filters"] = list(self.filters)
        if self.norm == "instance":  # the default is left out: cards and run keys written before the field stay as they were
            del d["norm"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNetConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise NetworkConfigError(f"unknown U-Net config keys {sorted(unknown)}; known: {sorted(known)}")
        data = dict(data)
        for key in ("filters", "strides", "kernel_sizes"):
            if key in data:
                data[key] = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in data[key])
        return cls(**data)


#: Named architectures. ``nnunet`` is the reference teacher of environment.md (16.5 M parameters);
#: ``ct_demo`` is the anisotropic CT teacher that trains on 2 CPU cores (16x96x96 patches at 3 mm);
#: ``tiny`` is for tests.
PRESETS: dict[str, UNetConfig] = {
    "nnunet": UNetConfig(),
    "ct_demo": UNetConfig(
        filters=(16, 32, 64, 128, 160),
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
        kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
        deep_supr_num=2,
    ),
    "tiny": UNetConfig(
        filters=(8, 16, 32),
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
        deep_supr_num=1,
    ),
}


def preset(name: str, **overrides: Any) -> UNetConfig:
    """Return a named architecture, with fields replaced by ``overrides`` (e.g. ``num_classes=5``)."""
    if name not in PRESETS:
        raise NetworkConfigError(f"unknown network preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def derive_student_config(teacher: UNetConfig, reduction: int = 4, min_channels: int = 8,
                          norm: str | None = None, stem: str = "full") -> UNetConfig:
    """The student of ReCo-KD: every stage width divided by ``reduction`` (= 2**t), floored at ``min_channels``.

    ``C'_i = max(C_i // reduction, min_channels)``, as in the authors' code release. Everything
    else (stages, strides, kernels, deep supervision) is the teacher's, and so is the normalisation
    unless ``norm`` is given (``"batch"``: a fully convolutional student, see :attr:`UNetConfig.norm`).
    ``stem="strided"`` drops the teacher's full-resolution first stage: the next stage becomes a
    strided stem (stride: both first strides combined) and the logits are upsampled to the input
    (:attr:`UNetConfig.strided_stem`), so the student's stages sit at the teacher's strides 2, 4, ...
    without any layer at full resolution, where a thin student spends most of its time
    (``benchmarks/student_architecture_speed.py``: a ÷4 CT student 2.1x the teacher's speed per
    window, 5.1x with a strided stem, OpenVINO bf16).

    Example:
        >>> derive_student_config(preset("nnunet"), reduction=4).filters
        (8, 16, 32, 64, 80)
    """
    if reduction < 1 or reduction & (reduction - 1):
        raise NetworkConfigError(f"reduction must be a power of two (1, 2, 4, 8, ...), got {reduction}")
    if min_channels < 1:
        raise NetworkConfigError(f"min_channels must be >= 1, got {min_channels}")
    if stem not in STEMS:
        raise NetworkConfigError(f"stem must be one of {STEMS}, got {stem!r}")
    filters = tuple(max(c // reduction, min(min_channels, c)) for c in teacher.filters)
    student = replace(teacher, filters=filters, norm=teacher.norm if norm is None else norm)
    if stem == "full":
        return student
    if teacher.strided_stem or teacher.num_stages < 4:
        raise NetworkConfigError(f"a strided stem drops the teacher's full-resolution first stage; this teacher has "
                                 f"{'none' if teacher.strided_stem else f'only {teacher.num_stages} stages'}")
    stem_stride = tuple(a * b for a, b in zip(teacher.strides[0], teacher.strides[1]))
    return replace(student, filters=filters[1:], strides=(stem_stride, *teacher.strides[2:]),
                   kernel_sizes=(teacher.kernel_sizes[0], *teacher.kernel_sizes[2:]),
                   deep_supr_num=max(1, min(teacher.deep_supr_num, teacher.num_stages - 3)))


#: :func:`derive_student_config`'s ``stem``: the teacher's full-resolution first stage, or a strided stem
STEMS = ("full", "strided")


#: inputs of at least this many elements take oneDNN in :class:`OneDNNConv3d` (below it PyTorch's
#: own choice is as fast or faster: the deepest, smallest stages)
ONEDNN_MIN_ELEMENTS = 1 << 18


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs oneDNN (``torch.mkldnn_convolution``) for large float32 CPU inputs
    without gradient, where PyTorch's own choice is the slow im2col path.

    Why: PyTorch picks oneDNN for a float32 CPU convolution only when the batch is above 1 or
    ``N * C * D * H > 20480`` (a rule written for 2D ``N, C, H, W`` tensors that ignores ``W``).
    A thin student's 8-channel 3D layer on a ``16 x 96 x 96`` window has ``1 * 8 * 16 * 96 =
    12288``: PyTorch runs ``slow_conv3d_forward``, which unfolds the input into a ``27 * C``-times
    larger column buffer (the extra peak memory), and the ÷4 CT student's window took 0.29 s
    against the 8x larger teacher's 0.27 s. With oneDNN it takes 0.077 s (measured with
    ``torch.profiler``, 1 thread; see README, *Speed of segmentation*). Results equal PyTorch's up to
    float rounding (max |difference| ~2e-5 on logits). Training (batch 2, gradients) and bf16
    autocast are left to PyTorch, which already picks oneDNN there.

    The state dict and module names are those of ``nn.Conv3d``; :func:`use_onednn_convolutions`
    switches a built network's layers in place.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling()
                and input.device.type == "cpu" and input.dtype == torch.float32 and weight.dtype == torch.float32
                and input.numel() >= ONEDNN_MIN_ELEMENTS and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and not torch.is_autocast_enabled("cpu")
                and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
                and torch.backends.mkldnn.is_available()):
            return torch.mkldnn_convolution(input.contiguous(), weight, bias, self.padding, self.stride,
                                            self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def use_onednn_convolutions(module: nn.Module) -> nn.Module:
    """Switch every plain ``nn.Conv3d`` of ``module`` to :class:`OneDNNConv3d` in place (same
    parameters, names and hooks); subclasses of ``nn.Conv3d`` are left alone. Returns ``module``."""
    for layer in module.modules():
        if type(layer) is nn.Conv3d:
            layer.__class__ = OneDNNConv3d
    return module


@contextlib.contextmanager
def plain_convolutions(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``module``'s :class:`OneDNNConv3d` layers are plain ``nn.Conv3d`` again
    (for exporters: TorchScript scripting, ONNX)."""
    switched = [layer for layer in module.modules() if type(layer) is OneDNNConv3d]
    for layer in switched:
        layer.__class__ = nn.Conv3d
    try:
        yield module
    finally:
        for layer in switched:
            layer.__class__ = OneDNNConv3d


def upsample_logits(output: Tensor, size: Sequence[int]) -> Tensor:
    """Trilinear upsampling of a U-Net's logits to ``size`` (unchanged when already that size).

    Args:
        output: ``(B, K, d, h, w)`` or MONAI's stacked deep-supervision output ``(B, 1 + S, K, d, h, w)``.
        size: ``(D, H, W)``, the input's spatial size.

    Returns:
        ``(B, K, D, H, W)`` or ``(B, 1 + S, K, D, H, W)``.
    """
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        size = tuple(size)  # the input's symbolic sizes: an exported graph upsamples to every input's size
    else:
        size = tuple(int(s) for s in size)
        if tuple(output.shape[-3:]) == size:
            return output
    if output.dim() == 6:
        heads = output.flatten(1, 2)
        return nn.functional.interpolate(heads, size=size, mode="trilinear", align_corners=False).unflatten(
            1, output.shape[1:3])
    return nn.functional.interpolate(output, size=size, mode="trilinear", align_corners=False)


@functools.lru_cache(maxsize=None)
def _training_heads_skip_layer_class() -> type:
    """MONAI's ``DynUNetSkipLayer`` that runs its deep-supervision head in training mode only (built
    lazily: MONAI is imported on first use).

    MONAI's layer evaluates ``super_head(upout)`` on every forward pass, in eval mode too, although
    ``DynUNet.forward`` returns those heads only when training: inference pays for 1x1x1 convolutions
    to K classes at every supervised decoder level and throws them away. Measured 2026-12-07 (2-core
    bf16 CPU, 16 x 96 x 96 window, PyTorch): the CT teacher 50.2 -> 48.7 ms in bf16, 138 -> 135 ms in
    fp32; its ÷4 student 24.3 -> 23.5 ms in bf16, fp32 within noise (ONNX graphs never held the heads).
    Same modules, state dict and training behaviour; TorchScript-scriptable (no ``super()`` call)."""
    from monai.networks.nets.dynunet import DynUNetSkipLayer

    class TrainingHeadsSkipLayer(DynUNetSkipLayer):
        """``DynUNetSkipLayer`` whose deep-supervision head runs only when ``self.training``."""

        def forward(self, x: Tensor) -> Tensor:
            downout = self.downsample(x)
            nextout = self.next_layer(downout)
            upout = self.upsample(nextout, downout)
            heads = self.heads  # a local, so TorchScript refines its Optional type
            if self.training and self.super_head is not None and heads is not None and self.index > 0:
                heads[self.index - 1] = self.super_head(upout)
            return upout

    return TrainingHeadsSkipLayer


def heads_in_training_only(module: nn.Module) -> nn.Module:
    """Switch every MONAI ``DynUNetSkipLayer`` of ``module`` to one that skips its deep-supervision
    head in eval mode (see :func:`_training_heads_skip_layer_class`), in place. Returns ``module``."""
    from monai.networks.nets.dynunet import DynUNetSkipLayer

    for layer in module.modules():
        if type(layer) is DynUNetSkipLayer:
            layer.__class__ = _training_heads_skip_layer_class()
    return module


@functools.lru_cache(maxsize=None)
def _strided_stem_unet_class() -> type:
    """``DynUNet`` subclass for a strided first stage: same modules and state dict, logits upsampled
    to the input's size (built lazily: MONAI is imported on first use)."""
    from monai.networks.nets import DynUNet

    class StridedStemDynUNet(DynUNet):
        """``DynUNet`` whose first stage is strided; :meth:`forward` upsamples the logits
        (:func:`upsample_logits`), so callers see the input's spatial size as with any U-Net."""

        def forward(self, x: Tensor) -> Tensor:
            return upsample_logits(super().forward(x), x.shape[2:])

    return StridedStemDynUNet


def build_unet(config: UNetConfig) -> nn.Module:
    """Build a MONAI ``DynUNet`` (``config.norm``, leaky ReLU, transposed-conv upsampling) from ``config``,
    its convolutions as :class:`OneDNNConv3d` (fast thin layers on the CPU) and its deep-supervision
    heads run in training only (:func:`heads_in_training_only`). A strided first stage
    (:attr:`UNetConfig.strided_stem`) gives a ``DynUNet`` subclass with the same state dict whose
    logits are upsampled to the input's size."""
    from monai.networks.nets import DynUNet

    network_class = _strided_stem_unet_class() if config.strided_stem else DynUNet
    return heads_in_training_only(use_onednn_convolutions(network_class(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.num_classes,
        kernel_size=[list(k) for k in config.kernel_sizes],
        strides=[list(s) for s in config.strides],
        upsample_kernel_size=[list(s) for s in config.strides[1:]],
        filters=list(config.filters),
        norm_name=NORMS[config.norm],
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=config.deep_supervision,
        deep_supr_num=config.deep_supr_num if config.deep_supervision else 1,
        res_block=config.res_block,
    )))


def cumulative_strides(config: UNetConfig) -> list[Triple]:
    """Each stage's stride relative to the input ``(D, H, W)``, stage 0 first (the strides of
    :func:`encoder_tap_names`' stages)."""
    out, total = [], (1, 1, 1)
    for stride in config.strides:
        total = tuple(t * int(s) for t, s in zip(total, stride))
        out.append(total)
    return out  # type: ignore[return-value]


def encoder_tap_names(config: UNetConfig, drop_deepest: bool = True) -> list[str]:
    """Module names of the encoder stage outputs of a ``DynUNet`` built from ``config``.

    Stage 0 is ``input_block``, stages 1..n-2 are ``downsamples.i``, the last is ``bottleneck``.
    ReCo-KD distils the encoder stages with the deepest one dropped (its scale has no matching
    deep-supervision target), so by default the bottleneck is left out.
    """
    names = ["input_block"] + [f"downsamples.{i}" for i in range(config.num_stages - 2)] + ["bottleneck"]
    return names[:-1] if drop_deepest else names


def split_deep_supervision(output: Tensor) -> list[Tensor]:
    """Split a ``DynUNet`` output into a list of logits, full resolution first.

    Args:
        output: ``(B, K, D, H, W)`` (eval, or no deep supervision) or MONAI's stacked training
            output ``(B, 1 + S, K, D, H, W)``, where every head is upsampled to full resolution.

    Returns:
        ``[(B, K, D, H, W), ...]``, one per head; a single element for a plain output.
    """
    if isinstance(output, (list, tuple)):  # dynamic-network-architectures: heads at their own resolution
        return list(output)
    if output.dim() == 6:
        return list(torch.unbind(output, dim=1))
    if output.dim() == 5:
        return [output]
    raise NetworkConfigError(f"expected network output of 5 or 6 dims, got shape {tuple(output.shape)}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, patch_size: Sequence[int], in_channels: int = 1) -> int:
    """Floating-point operations of one eval-mode forward pass on a ``(1, in_channels, *patch_size)`` input.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2 FLOPs),
    on the meta device where possible so nothing is allocated.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.zeros((1, in_channels, *patch_size), device=device)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


def summarize(model: nn.Module, config: UNetConfig | None = None, patch_size: Sequence[int] | None = None) -> str:
    """One line: parameters, widths and (if a patch is given) GFLOPs per forward pass."""
    parts = [f"{count_parameters(model) / 1e6:.2f} M params"]
    if config is not None:
        parts.append("widths " + "-".join(str(f) for f in config.filters))
    if patch_size is not None:
        in_ch = config.in_channels if config is not None else 1
        gflops = count_flops(model, patch_size, in_ch) / 1e9
        parts.append(f"{gflops:.2f} GFLOPs @ {'x'.join(str(p) for p in patch_size)}")
    return ", ".join(parts)
