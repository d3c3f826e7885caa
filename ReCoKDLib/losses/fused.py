"""Depth-chunked, memory-lean reductions over 3D feature maps, with hand-written backward passes.

ReCo-KD reads every voxel of every distilled level several times (attention maps, region losses,
global-context pooling). Written with plain tensor ops, each read creates full
``(B, C, D, H, W)`` temporaries, and autograd keeps several of them alive until the backward pass
(the authors' code raises peak memory by about 7x the features it reads). The three
``torch.autograd.Function`` s here walk the volume in slabs of ``chunk`` depth slices, keep only
their (already existing) inputs for the backward pass, and recompute per slab what they need
there. Their only full-size allocation is the gradient of the student features.

Per call, the few slab-sized work arrays live in one :class:`Workspace` allocated at the first
(largest) slab and written in place by every later slab (``out=`` and in-place ops, one batched
GEMM per projection), so the slab loop allocates no slab-sized memory: no page faults and no
zeroing of fresh pages per slab. A 1x1x1 projection before attention pooling is applied to the
pooled ``(B, C_in)`` vector instead of the volume (:func:`context_pool`).

Each takes the student features *before* an optional 1x1x1 projection ``(weight, bias)`` (the
feature adapter), so the adapted features ``x~ = weight @ x + bias`` are never materialised
either. Arithmetic is float32 whatever the input dtype (bfloat16 features are read slab by slab),
and autocast is disabled inside.

Shapes: ``x`` ``(B, C_in, D, H, W)``; ``weight`` ``(C, C_in)``; ``bias`` ``(C,)``; ``C`` the
channels after projection (``C = C_in`` without one); ``N = D * H * W``.
"""

from __future__ import annotations

import math
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


class Workspace:
    """Reusable float32 work arrays for a slab loop, one per name.

    ``get(name, shape)`` returns a contiguous view of the first ``prod(shape)`` elements of the
    array ``name``, allocated on first use (the first slab is the largest one, so later slabs
    reuse it; a larger request re-allocates). Contents are garbage until written.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._arrays: dict[str, Tensor] = {}

    def get(self, name: str, shape: Sequence[int]) -> Tensor:
        n = math.prod(shape)
        array = self._arrays.get(name)
        if array is None or array.numel() < n:
            array = torch.empty(n, dtype=torch.float32, device=self.device)
            self._arrays[name] = array
        return array[:n].view(tuple(shape))


def _as_float(x: Tensor, ws: Workspace, name: str) -> Tensor:
    """``x`` itself when float32, else its float32 copy in the work array ``name``."""
    if x.dtype == torch.float32:
        return x
    return ws.get(name, x.shape).copy_(x)


def _project_into(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``out (B, C, d, H, W) = weight (C, C_in) @ x (B, C_in, d, H, W) + bias``, all float32.

    One batched GEMM straight from the slab view (rows ``d*H*W`` contiguous) into ``out``: no
    transposed copies, no temporaries.
    """
    b, c = out.shape[:2]
    dst, src = out.view(b, c, -1), x.flatten(2)
    w = weight.expand(b, *weight.shape)
    if bias is None:
        torch.bmm(w, src, out=dst)
    else:
        torch.baddbmm(bias[None, :, None].expand_as(dst), w, src, out=dst)
    return out


def _project_slab(
    x: Tensor, sl: slice, weight: Tensor | None, bias: Tensor | None, ws: Workspace, name: str = "proj"
) -> tuple[Tensor, bool]:
    """The float32 slab ``x~[:, :, sl] = weight @ x[:, :, sl] + bias`` ``(B, C, d, H, W)``.

    Returns ``(slab, owned)``: ``owned`` is false when ``slab`` is a view of ``x`` itself (float32
    input, no projection); never modify such a slab in place.
    """
    xs = x[:, :, sl]
    if weight is None:
        if bias is None:
            if xs.dtype == torch.float32:
                return xs, False
            return ws.get(name, xs.shape).copy_(xs), True
        out = ws.get(name, xs.shape).copy_(xs)
        return out.add_(bias.float()[None, :, None, None, None]), True
    xf = _as_float(xs, ws, "x")
    out = ws.get(name, (xs.shape[0], weight.shape[0], *xs.shape[2:]))
    return _project_into(xf, weight.float(), None if bias is None else bias.float(), out), True


def _diff_slab(x: Tensor, target: Tensor, sl: slice, weight, bias, ws: Workspace) -> Tensor:
    """float32 ``x~[:, :, sl] - target[:, :, sl]`` in the work array ``"diff"``."""
    xp, owned = _project_slab(x, sl, weight, bias, ws, "diff")
    if owned:
        return xp.sub_(target[:, :, sl])
    return torch.sub(xp, target[:, :, sl], out=ws.get("diff", xp.shape))


class _Backprojector:
    """Accumulates, slab by slab, the gradients of ``x``, ``weight`` and ``bias`` from ``dL/dx~``."""

    def __init__(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, needs: Sequence[bool], ws: Workspace) -> None:
        self.x, self.weight, self.ws = x, weight, ws
        self.weight_t = weight.float().t().expand(x.shape[0], -1, -1) if weight is not None else None  # (B, C_in, C)
        self.grad_x = torch.empty_like(x) if needs[0] else None
        self.grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if weight is not None and needs[1] else None
        self.grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if bias is not None and needs[2] else None

    def add(self, sl: slice, grad_proj: Tensor) -> None:
        """``grad_proj``: float32 ``(B, C, d, H, W)``, the gradient w.r.t. the projected slab ``sl``."""
        if self.weight is None:
            if self.grad_x is not None:
                self.grad_x[:, :, sl].copy_(grad_proj)
        else:
            g = grad_proj.flatten(2)  # (B, C, N)
            if self.grad_x is not None:
                dst = self.grad_x[:, :, sl].flatten(2)  # (B, C_in, N) view of the result
                if dst.dtype == torch.float32:
                    torch.bmm(self.weight_t, g, out=dst)
                else:
                    dst.copy_(torch.bmm(self.weight_t, g, out=self.ws.get("grad_x", dst.shape)))
            if self.grad_w is not None:
                xf = _as_float(self.x[:, :, sl], self.ws, "x_back")
                self.grad_w.addbmm_(g, xf.flatten(2).transpose(1, 2))
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
            mw = mask_weight.float()[None, None, :].expand(b, 1, -1) if mask_weight is not None else None  # (B, 1, C)
            ws = Workspace(x.device)
            for sl in depth_slabs(d, chunk):
                xp, owned = _project_slab(x, sl, weight, bias, ws)
                if mw is not None:
                    torch.bmm(mw, xp.flatten(2), out=logits[:, sl].flatten(1).unsqueeze(1))
                xa = xp.abs_() if owned else torch.abs(xp, out=ws.get("abs", xp.shape))
                torch.mean(xa, dim=1, out=spatial[:, sl])
                channel += xa.sum(dim=(2, 3, 4))
            channel /= d * h * w
            if mask_bias is not None:
                logits += mask_bias.float()
        ctx.save_for_backward(x, weight, bias, mask_weight)
        ctx.chunk = chunk
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
            ws = Workspace(x.device)
            back = _Backprojector(x, weight, bias, needs[:3], ws)
            c = weight.shape[0] if weight is not None else x.shape[1]
            g_mask_w = torch.zeros(c, dtype=torch.float32, device=x.device) if needs[3] and g_logits is not None else None
            if any(needs[:3]) or g_mask_w is not None:
                mw = mask_weight.float()[None, :, None, None, None] if mask_weight is not None else None
                gs = (g_spatial.float() / c).unsqueeze(1) if g_spatial is not None else None  # (B, 1, D, H, W)
                gc = (g_channel.float() / n)[:, :, None, None, None] if g_channel is not None else None
                gl = g_logits.float().unsqueeze(1) if g_logits is not None else None
                for sl in depth_slabs(d, ctx.chunk):
                    xp, owned = _project_slab(x, sl, weight, bias, ws)
                    if g_mask_w is not None:  # matrix-vector products: per sample (bmm is slow for these)
                        for i in range(b):
                            g_mask_w.addmv_(xp[i].flatten(1), gl[i, 0, sl].reshape(-1))
                    if not any(needs[:3]):
                        continue
                    grad = ws.get("grad", xp.shape)
                    if gs is not None or gc is not None:
                        # d|x~|/dx~ = sign(x~), times the spatial and channel mean gradients
                        if gs is not None and gc is not None:
                            torch.add(gs[:, :, sl], gc, out=grad)
                        else:
                            grad.copy_((gs[:, :, sl] if gs is not None else gc).expand_as(grad))
                        grad.mul_(xp.sign_() if owned else torch.sign(xp, out=ws.get("sign", xp.shape)))
                    else:
                        grad.zero_()
                    if gl is not None:
                        grad.addcmul_(mw, gl[:, :, sl])
                    back.add(sl, grad)
            gx, gw, gb = back.grads()
        g_mask_b = None
        if needs[4] and g_logits is not None:
            g_mask_b = g_logits.float().sum().reshape(1)
        if g_mask_w is not None:
            g_mask_w = g_mask_w.to(mask_weight.dtype)
        return gx, gw, gb, g_mask_w, g_mask_b, None


class ContextPool(torch.autograd.Function):
    """Attention pooling ``(x (B, C, D, H, W), alpha (B, D, H, W), chunk)`` -> ``(B, C) = sum_v alpha_v x_v``.

    No projection here: :func:`context_pool` pools the raw features and applies a 1x1x1 adapter to
    the ``(B, C_in)`` result (``sum_v alpha_v (W x_v + b) = W (sum_v alpha_v x_v) + b sum_v alpha_v``).
    """

    @staticmethod
    def forward(ctx, x, alpha, chunk):
        b, c, d, h, w = x.shape
        with _no_autocast(x.device):
            pooled = torch.zeros((b, c), dtype=torch.float32, device=x.device)
            a = alpha.float()
            ws = Workspace(x.device)
            for sl in depth_slabs(d, chunk):
                xf = _as_float(x[:, :, sl], ws, "x")
                for i in range(b):  # matrix-vector products: per sample (bmm is slow for these)
                    pooled[i].addmv_(xf[i].flatten(1), a[i, sl].reshape(-1))
        ctx.save_for_backward(x, alpha)
        ctx.chunk = chunk
        return pooled

    @staticmethod
    def backward(ctx, g_pooled):
        x, alpha = ctx.saved_tensors
        needs = ctx.needs_input_grad
        b, c, d = x.shape[:3]
        with _no_autocast(x.device):
            grad_x = torch.empty_like(x) if needs[0] else None
            g_alpha = torch.empty(alpha.shape, dtype=torch.float32, device=x.device) if needs[1] else None
            g = g_pooled.float()
            a = alpha.float()
            ws = Workspace(x.device)
            for sl in depth_slabs(d, ctx.chunk):
                if g_alpha is not None:
                    xf = _as_float(x[:, :, sl], ws, "x")
                    for i in range(b):
                        torch.mv(xf[i].flatten(1).t(), g[i], out=g_alpha[i, sl].view(-1))
                if grad_x is not None:  # outer product g_b a_b, written into the result
                    torch.mul(g[:, :, None], a[:, sl].flatten(1).unsqueeze(1), out=grad_x[:, :, sl].flatten(2))
        return grad_x, (g_alpha.to(alpha.dtype) if g_alpha is not None else None), None


class WeightedSquaredError(torch.autograd.Function):
    """Several weighted sums of squared differences in one pass over ``x`` and ``target``.

    Forward: ``(x, weight, bias, target, offset, groups, num_rows, chunk)`` -> ``(M,)`` float32 with

        out[m] = sum_{b,c,v} w_m[b, v] * a_m[b, c] * (x~[b, c, v] - target[b, c, v] + o_m[b, c])^2

    ``groups`` is a list of ``(a, use_offset, members)``: rows that share the channel weights
    ``a`` ``(B, C)`` (or ``None``, all ones) and the offset (``offset`` ``(B, C)`` where
    ``use_offset``, 0 otherwise); ``members`` lists ``(m, w_m)`` with ``w_m`` ``(B, D, H, W)``
    voxel weights or ``None`` (all ones). A group's ``sum_c a_c (x~ - t + o)^2`` is computed once
    per slab for all its rows. The weights are constants (no gradient); ``x``, ``weight``,
    ``bias``, ``target`` and ``offset`` get exact gradients.

    The weight ``w_v * a_c`` is rank one, so the gradient ``2 sum_m g_m w_m a_m (x~ - t + o_m)`` is
    recomputed slab by slab in backward from the saved inputs alone.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, offset, groups, num_rows, chunk):
        b, _, d = x.shape[:3]
        with _no_autocast(x.device):
            out = torch.zeros(num_rows, dtype=torch.float32, device=x.device)
            off = offset.float()[:, :, None, None, None]
            ws = Workspace(x.device)
            for sl in depth_slabs(d, chunk):
                diff = _diff_slab(x, target, sl, weight, bias, ws)
                for cw, use_offset, members in groups:
                    sq = ws.get("square", diff.shape)
                    if use_offset:
                        torch.add(diff, off, out=sq).square_()
                    else:
                        torch.square(diff, out=sq)
                    per_voxel = ws.get("per_voxel", (b, *diff.shape[2:]))
                    if cw is None:
                        torch.sum(sq, dim=1, out=per_voxel)
                    else:
                        torch.bmm(cw.float().unsqueeze(1), sq.flatten(2), out=per_voxel.view(b, 1, -1))
                    for m, vw in members:
                        if vw is None:
                            out[m] += per_voxel.sum()
                        else:
                            out[m] += torch.bmm(per_voxel.view(b, 1, -1), vw[:, sl].float().flatten(1).unsqueeze(2)).sum()
        ctx.save_for_backward(x, weight, bias, target, offset)
        ctx.groups, ctx.chunk = groups, chunk
        return out

    @staticmethod
    def backward(ctx, g_out):
        x, weight, bias, target, offset = ctx.saved_tensors
        needs = ctx.needs_input_grad
        groups, d = ctx.groups, x.shape[2]
        with _no_autocast(x.device):
            ws = Workspace(x.device)
            back = _Backprojector(x, weight, bias, needs[:3], ws)
            g_target = torch.empty_like(target) if needs[3] else None
            g_offset = torch.zeros(offset.shape, dtype=torch.float32, device=x.device) if needs[4] else None
            g2 = 2.0 * g_out.float()
            off = offset.float()[:, :, None, None, None]
            for sl in depth_slabs(d, ctx.chunk):
                diff = _diff_slab(x, target, sl, weight, bias, ws)
                grad = ws.get("grad", diff.shape)
                for k, (cw, use_offset, members) in enumerate(groups):
                    # the group's gradient 2 a_c (x~ - t + o) sum_m g_m w_m[v], built in ``term``
                    term = grad if k == 0 else ws.get("term", diff.shape)
                    voxel = _group_voxel_weight(members, g2, sl, diff, ws)
                    if use_offset:
                        torch.add(diff, off, out=term).mul_(voxel)
                    else:
                        torch.mul(diff, voxel, out=term)
                    if cw is not None:
                        term.mul_(cw.float()[:, :, None, None, None])
                    if use_offset and g_offset is not None:
                        g_offset += term.sum(dim=(2, 3, 4))
                    if k > 0:
                        grad.add_(term)
                if not groups:
                    grad.zero_()
                if any(needs[:3]):
                    back.add(sl, grad)
                if g_target is not None:
                    torch.neg(grad, out=g_target[:, :, sl])
            gx, gw, gb = back.grads()
        if g_offset is not None:
            g_offset = g_offset.to(offset.dtype)
        return gx, gw, gb, g_target, g_offset, None, None, None


def _group_voxel_weight(members, g2: Tensor, sl: slice, diff: Tensor, ws: Workspace) -> Tensor:
    """``sum_m g2[m] w_m[:, sl]`` as ``(B, 1, d, H, W)`` (a 0-d tensor when every ``w_m`` is all ones)."""
    if all(vw is None for _, vw in members):
        return g2[[m for m, _ in members]].sum()
    voxel = ws.get("voxel", (diff.shape[0], 1, *diff.shape[2:])).zero_()
    for m, vw in members:
        if vw is None:
            voxel.add_(g2[m])
        else:
            voxel.addcmul_(vw[:, sl].unsqueeze(1), g2[m])
    return voxel


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
    """``sum_v alpha[b, v] x~[b, :, v]`` ``(B, C)`` float32 for ``x`` ``(B, C_in, D, H, W)``, ``alpha`` ``(B, D, H, W)``.

    A projection is applied after pooling, to the ``(B, C_in)`` vector (exact: the map is affine),
    so the pooling pass reads only the raw features.
    """
    chunk = chunk or auto_chunk(x.shape)
    pooled = ContextPool.apply(x, alpha, chunk)
    if projection is None:
        return pooled
    weight, bias = projection
    with _no_autocast(x.device):
        pooled = pooled @ weight.float().t()
        if bias is not None:
            pooled = pooled + alpha.float().flatten(1).sum(dim=1, keepdim=True) * bias.float()
    return pooled


def weighted_squared_errors(
    x: Tensor,
    target: Tensor,
    rows: Sequence[tuple[Tensor | None, Tensor | None, bool]],
    projection: tuple[Tensor, Tensor | None] | None = None,
    offset: Tensor | None = None,
    chunk: int | None = None,
) -> Tensor:
    """The ``(M,)`` float32 sums of :class:`WeightedSquaredError` for ``x`` ``(B, C_in, ...)``, ``target`` ``(B, C, ...)``.

    Args:
        rows: ``(voxel_weights (B, D, H, W) or None, channel_weights (B, C) or None, use_offset)``
            per output; rows passing the *same* channel-weight tensor object (and offset use)
            share one squared-error pass per slab. Weights are treated as constants.
        projection: ``(weight (C, C_in), bias (C,) or None)`` applied to ``x`` first, or ``None``.
        offset: ``(B, C)`` added to ``x~ - target`` in the rows that use it.
    """
    weight, bias = projection if projection is not None else (None, None)
    if offset is None:
        if any(r[2] for r in rows):
            raise ValueError("a row uses the offset but no offset was given")
        offset = torch.zeros(target.shape[:2], dtype=torch.float32, device=target.device)
    groups: list[tuple[Tensor | None, bool, list]] = []
    keys: list[tuple[Tensor | None, bool]] = []
    for m, (vw, cw, use_offset) in enumerate(rows):
        key = next((k for k, (c, u) in enumerate(keys) if c is cw and u == bool(use_offset)), None)
        if key is None:
            keys.append((cw, bool(use_offset)))
            groups.append((None if cw is None else cw.detach(), bool(use_offset), []))
            key = len(groups) - 1
        groups[key][2].append((m, None if vw is None else vw.detach()))
    chunk = chunk or auto_chunk((x.shape[0], max(target.shape[1], x.shape[1]), *x.shape[2:]))
    return WeightedSquaredError.apply(x, weight, bias, target, offset, groups, len(rows), chunk)
