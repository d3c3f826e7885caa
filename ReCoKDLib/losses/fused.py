"""Depth-chunked, memory-lean reductions over 3D feature maps, with hand-written backward passes.

ReCo-KD reads every voxel of every distilled level several times (attention maps, region losses,
global-context pooling). Written with plain tensor ops, each read creates full
``(B, C, D, H, W)`` temporaries, and autograd keeps several of them alive until the backward pass
(the authors' code raises peak memory by about 7x the features it reads). The three
``torch.autograd.Function`` s here walk the volume in slabs of ``chunk`` depth slices, keep only
their (already existing) inputs for the backward pass, and recompute per slab what they need
there. Their only full-size allocation is the gradient of the student features.

Each takes the student features *before* an optional 1x1x1 projection ``(weight, bias)`` (the
feature adapter), so the adapted features ``x~ = weight @ x + bias`` are never materialised
either. Arithmetic is float32 whatever the input dtype (bfloat16 features are read slab by slab),
and autocast is disabled inside.

Shapes: ``x`` ``(B, C_in, D, H, W)``; ``weight`` ``(C, C_in)``; ``bias`` ``(C,)``; ``C`` the
channels after projection (``C = C_in`` without one); ``N = D * H * W``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

#: default number of elements (B * C * d * H * W) in one slab: 1 Mi floats = 4 MiB.
DEFAULT_CHUNK_ELEMENTS = 1 << 20


def auto_chunk(shape: Sequence[int], elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Depth slices per slab for a ``(B, C, D, H, W)`` tensor: about ``elements`` per slab and at
    most a thirty-second of the depth, so that slab temporaries stay small next to the features."""
    b, c, d, h, w = (int(s) for s in shape)
    return max(1, min(d // 32, elements // max(1, b * c * h * w)))


def depth_slabs(depth: int, chunk: int) -> list[slice]:
    """``[slice(0, chunk), slice(chunk, 2 * chunk), ...]`` covering ``range(depth)``."""
    if chunk < 1:
        raise ValueError(f"chunk size must be a positive number of depth slices, got {chunk}")
    return [slice(d0, min(depth, d0 + chunk)) for d0 in range(0, depth, chunk)]


def _project(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``(B, C_in, d, H, W)`` slab -> float32 ``(B, C, d, H, W)`` = ``weight @ x + bias``.

    One batched GEMM on the ``(B, C_in, d*H*W)`` view of the slab. Without a projection this may
    return ``x`` itself: never modify the result in place.
    """
    x = x.float()
    if weight is None:
        return x if bias is None else x + bias.float()[None, :, None, None, None]
    out = torch.matmul(weight.float(), x.flatten(2))
    if bias is not None:
        out += bias.float()[None, :, None]
    return out.view(x.shape[0], weight.shape[0], *x.shape[2:])


def _voxel_contract(x: Tensor, v: Tensor) -> Tensor:
    """``sum_v x[b, c, v] v[b, v]``: ``(B, C, d, H, W)``, ``(B, d, H, W)`` -> ``(B, C)`` (batched GEMV)."""
    return torch.bmm(x.flatten(2), v.flatten(1).unsqueeze(2)).squeeze(2)


def _channel_contract(x: Tensor, c: Tensor) -> Tensor:
    """``sum_c c[b, c] x[b, c, v]``: ``(B, C, d, H, W)``, ``(B, C)`` -> ``(B, d, H, W)``."""
    return torch.bmm(c.unsqueeze(1), x.flatten(2)).view(x.shape[0], *x.shape[2:])


class _Backprojector:
    """Accumulates, slab by slab, the gradients of ``x``, ``weight`` and ``bias`` from ``dL/dx~``."""

    def __init__(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, needs: Sequence[bool]) -> None:
        self.x, self.weight = x, weight
        self.grad_x = torch.empty_like(x) if needs[0] else None
        self.grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if weight is not None and needs[1] else None
        self.grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if bias is not None and needs[2] else None

    def add(self, sl: slice, grad_proj: Tensor) -> None:
        """``grad_proj``: float32 ``(B, C, d, H, W)``, the gradient w.r.t. the projected slab ``sl``."""
        if self.weight is None:
            if self.grad_x is not None:
                self.grad_x[:, :, sl] = grad_proj
        else:
            flat = grad_proj.flatten(2)  # (B, C, N)
            if self.grad_x is not None:
                back = torch.matmul(self.weight.float().t(), flat)
                self.grad_x[:, :, sl] = back.view(self.x.shape[0], self.x.shape[1], *grad_proj.shape[2:])
            if self.grad_w is not None:
                self.grad_w += torch.bmm(flat, self.x[:, :, sl].float().flatten(2).transpose(1, 2)).sum(0)
        if self.grad_b is not None:
            self.grad_b += grad_proj.sum(dim=(0, 2, 3, 4))

    def grads(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        gw = self.grad_w.to(self.weight.dtype) if self.grad_w is not None else None
        gb = self.grad_b.to(self.weight.dtype if self.weight is not None else self.grad_b.dtype) if self.grad_b is not None else None
        return self.grad_x, gw, gb


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class AbsStatistics(torch.autograd.Function):
    """Mean absolute activation per voxel and per channel, and an optional 1x1x1 "mask" projection.

    Forward: ``(x, weight, bias, mask_weight, mask_bias, chunk)`` ->
    ``spatial (B, D, H, W) = mean_c |x~|``, ``channel (B, C) = mean_v |x~|``,
    ``logits (B, D, H, W) = sum_c mask_weight_c x~_c + mask_bias`` (zeros without ``mask_weight``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mask_weight, mask_bias, chunk):
        ctx.set_materialize_grads(False)
        b, _, d, h, w = x.shape
        with _no_autocast(x.device):
            c = weight.shape[0] if weight is not None else x.shape[1]
            spatial = torch.empty((b, d, h, w), dtype=torch.float32, device=x.device)
            channel = torch.zeros((b, c), dtype=torch.float32, device=x.device)
            logits = torch.zeros((b, d, h, w), dtype=torch.float32, device=x.device)
            mw = mask_weight.float() if mask_weight is not None else None
            for sl in depth_slabs(d, chunk):
                xp = _project(x[:, :, sl], weight, bias)
                if mw is not None:
                    logits[:, sl] = _channel_contract(xp, mw.expand(b, -1))
                xp = xp.abs()  # never in place: without a projection xp aliases the input
                spatial[:, sl] = xp.mean(dim=1)
                channel += xp.sum(dim=(2, 3, 4))
            channel /= d * h * w
            if mask_bias is not None:
                logits += mask_bias.float()
        ctx.save_for_backward(x, weight, bias, mask_weight)
        ctx.chunk = chunk
        ctx.has_mask_bias = mask_bias is not None
        ctx.mark_non_differentiable(*([] if mask_weight is not None else [logits]))
        return spatial, channel, logits

    @staticmethod
    def backward(ctx, g_spatial, g_channel, g_logits):
        x, weight, bias, mask_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        b, _, d, h, w = x.shape
        n = d * h * w
        if mask_weight is None:
            g_logits = None
        with _no_autocast(x.device):
            back = _Backprojector(x, weight, bias, needs[:3])
            c = weight.shape[0] if weight is not None else x.shape[1]
            g_mask_w = torch.zeros(c, dtype=torch.float32, device=x.device) if needs[3] else None
            if any(needs[:3]) or g_mask_w is not None:
                mw = mask_weight.float() if mask_weight is not None else None
                for sl in depth_slabs(d, ctx.chunk):
                    xp = _project(x[:, :, sl], weight, bias)
                    grad = torch.zeros_like(xp) if (g_spatial is None and g_channel is None) else None
                    if g_spatial is not None or g_channel is not None:
                        scale = 0.0
                        if g_spatial is not None:
                            scale = (g_spatial[:, sl].float() / c).unsqueeze(1)
                        if g_channel is not None:
                            scale = scale + (g_channel.float() / n)[:, :, None, None, None]
                        grad = torch.sign(xp) * scale
                    if g_logits is not None:
                        gl = g_logits[:, sl].float().unsqueeze(1)
                        grad = grad + mw[None, :, None, None, None] * gl
                        if g_mask_w is not None:
                            g_mask_w += _voxel_contract(xp, gl[:, 0]).sum(0)
                    if any(needs[:3]):
                        back.add(sl, grad)
            gx, gw, gb = back.grads()
        g_mask_b = None
        if needs[4] and g_logits is not None:
            g_mask_b = g_logits.float().sum().reshape(1)
        if g_mask_w is not None and mask_weight is not None:
            g_mask_w = g_mask_w.to(mask_weight.dtype)
        return gx, gw, gb, g_mask_w, g_mask_b, None


class ContextPool(torch.autograd.Function):
    """Attention pooling ``(x, weight, bias, alpha (B, D, H, W), chunk)`` -> ``(B, C) = sum_v alpha_v x~_v``."""

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, chunk):
        b, _, d, h, w = x.shape
        with _no_autocast(x.device):
            c = weight.shape[0] if weight is not None else x.shape[1]
            pooled = torch.zeros((b, c), dtype=torch.float32, device=x.device)
            a = alpha.float()
            for sl in depth_slabs(d, chunk):
                pooled += _voxel_contract(_project(x[:, :, sl], weight, bias), a[:, sl])
        ctx.save_for_backward(x, weight, bias, alpha)
        ctx.chunk = chunk
        return pooled

    @staticmethod
    def backward(ctx, g_pooled):
        x, weight, bias, alpha = ctx.saved_tensors
        needs = ctx.needs_input_grad
        d = x.shape[2]
        with _no_autocast(x.device):
            back = _Backprojector(x, weight, bias, needs[:3])
            g_alpha = torch.empty(alpha.shape, dtype=torch.float32, device=x.device) if needs[3] else None
            g = g_pooled.float()
            a = alpha.float()
            for sl in depth_slabs(d, ctx.chunk):
                if g_alpha is not None:
                    g_alpha[:, sl] = _channel_contract(_project(x[:, :, sl], weight, bias), g)
                if any(needs[:3]):
                    back.add(sl, g[:, :, None, None, None] * a[:, sl].unsqueeze(1))
            gx, gw, gb = back.grads()
        return gx, gw, gb, (g_alpha.to(alpha.dtype) if g_alpha is not None else None), None


class WeightedSquaredError(torch.autograd.Function):
    """Several weighted sums of squared differences in one pass over ``x`` and ``target``.

    Forward: ``(x, weight, bias, target, offset, rows, chunk)`` -> ``(M,)`` float32 with

        out[m] = sum_{b,c,v} w_m[b, v] * a_m[b, c] * (x~[b, c, v] - target[b, c, v] + o_m[b, c])^2

    ``rows`` is a list of ``(w_m, a_m, use_offset)``: ``w_m`` ``(B, D, H, W)`` voxel weights or
    ``None`` (all ones), ``a_m`` ``(B, C)`` channel weights or ``None``; ``o_m`` is ``offset``
    ``(B, C)`` where ``use_offset`` and 0 otherwise. The weights in ``rows`` are constants (no
    gradient); ``x``, ``weight``, ``bias``, ``target`` and ``offset`` get exact gradients.

    The weight ``w_v * a_c`` is rank one, so the gradient ``2 sum_m g_m w_m a_m (x~ - t + o_m)`` is
    recomputed slab by slab in backward from the saved inputs alone.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, offset, rows, chunk):
        d = x.shape[2]
        with _no_autocast(x.device):
            out = torch.zeros(len(rows), dtype=torch.float32, device=x.device)
            for sl in depth_slabs(d, chunk):
                diff = _project(x[:, :, sl], weight, bias) - target[:, :, sl].float()
                for m, (vw, cw, use_offset) in enumerate(rows):
                    e = diff + offset.float()[:, :, None, None, None] if use_offset else diff.clone()
                    e.square_()
                    if cw is not None:
                        e *= cw.float()[:, :, None, None, None]
                    per_voxel = e.sum(dim=1)
                    out[m] += (per_voxel * vw[:, sl].float()).sum() if vw is not None else per_voxel.sum()
        ctx.save_for_backward(x, weight, bias, target, offset)
        ctx.rows, ctx.chunk = rows, chunk
        return out

    @staticmethod
    def backward(ctx, g_out):
        x, weight, bias, target, offset = ctx.saved_tensors
        needs = ctx.needs_input_grad
        rows, d = ctx.rows, x.shape[2]
        with _no_autocast(x.device):
            back = _Backprojector(x, weight, bias, needs[:3])
            g_target = torch.empty_like(target) if needs[3] else None
            g_offset = torch.zeros(offset.shape, dtype=torch.float32, device=x.device) if needs[4] else None
            g = g_out.float()
            for sl in depth_slabs(d, ctx.chunk):
                diff = _project(x[:, :, sl], weight, bias) - target[:, :, sl].float()
                grad = torch.zeros_like(diff)
                for m, (vw, cw, use_offset) in enumerate(rows):
                    e = diff + offset.float()[:, :, None, None, None] if use_offset else diff
                    scale = 2.0 * g[m]
                    term = e * (vw[:, sl].float().unsqueeze(1) * scale) if vw is not None else e * scale
                    if cw is not None:
                        term = term * cw.float()[:, :, None, None, None]
                    grad += term
                    if use_offset and g_offset is not None:
                        g_offset += term.sum(dim=(2, 3, 4))
                if any(needs[:3]):
                    back.add(sl, grad)
                if g_target is not None:
                    g_target[:, :, sl] = -grad
            gx, gw, gb = back.grads()
        if g_offset is not None:
            g_offset = g_offset.to(offset.dtype)
        return gx, gw, gb, g_target, g_offset, None, None


def abs_statistics(
    x: Tensor,
    projection: tuple[Tensor, Tensor | None] | None = None,
    mask: tuple[Tensor, Tensor | None] | None = None,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``mean_c |x~|`` ``(B, D, H, W)``, ``mean_v |x~|`` ``(B, C)`` and mask logits ``(B, D, H, W)``.

    Args:
        x: ``(B, C_in, D, H, W)`` features.
        projection: ``(weight (C, C_in), bias (C,) or None)`` applied first, or ``None``.
        mask: ``(mask_weight (C,), mask_bias (1,) or None)`` for the logits, or ``None`` (zeros).
        chunk: depth slices per slab (default: :func:`auto_chunk`).
    """
    weight, bias = projection if projection is not None else (None, None)
    mask_weight, mask_bias = mask if mask is not None else (None, None)
    c = weight.shape[0] if weight is not None else x.shape[1]
    chunk = chunk or auto_chunk((x.shape[0], max(c, x.shape[1]), *x.shape[2:]))
    return AbsStatistics.apply(x, weight, bias, mask_weight, mask_bias, chunk)


def context_pool(
    x: Tensor, alpha: Tensor, projection: tuple[Tensor, Tensor | None] | None = None, chunk: int | None = None
) -> Tensor:
    """``sum_v alpha[b, v] x~[b, :, v]`` ``(B, C)`` for ``x`` ``(B, C_in, D, H, W)``, ``alpha`` ``(B, D, H, W)``."""
    weight, bias = projection if projection is not None else (None, None)
    c = weight.shape[0] if weight is not None else x.shape[1]
    chunk = chunk or auto_chunk((x.shape[0], max(c, x.shape[1]), *x.shape[2:]))
    return ContextPool.apply(x, weight, bias, alpha, chunk)


def weighted_squared_errors(
    x: Tensor,
    target: Tensor,
    rows: Sequence[tuple[Tensor | None, Tensor | None, bool]],
    projection: tuple[Tensor, Tensor | None] | None = None,
    offset: Tensor | None = None,
    chunk: int | None = None,
) -> Tensor:
    """The ``(M,)`` sums of :class:`WeightedSquaredError` for ``x`` ``(B, C_in, ...)``, ``target`` ``(B, C, ...)``."""
    weight, bias = projection if projection is not None else (None, None)
    if offset is None:
        if any(r[2] for r in rows):
            raise ValueError("a row uses the offset but no offset was given")
        offset = torch.zeros(target.shape[:2], dtype=torch.float32, device=target.device)
    rows = [(None if vw is None else vw.detach(), None if cw is None else cw.detach(), bool(u)) for vw, cw, u in rows]
    chunk = chunk or auto_chunk((x.shape[0], max(target.shape[1], x.shape[1]), *x.shape[2:]))
    return WeightedSquaredError.apply(x, weight, bias, target, offset, rows, chunk)
