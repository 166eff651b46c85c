"""Cross entropy of a linear layer's output without materialising its logits.

``linear_cross_entropy(x, W, target, b)`` equals
``F.cross_entropy(x @ W.T + b, target)`` but walks the rows of ``x`` in chunks:
for each chunk it forms the chunk's logits (one GEMM), runs the cross-entropy
kernel, which overwrites the logits with their gradient in place, and folds
that gradient into ``dx`` (one GEMM) and ``dW``/``db`` (one GEMM, accumulated).
Only one chunk of logits ever exists. For ``reduction`` "mean"/"sum" the
gradients are computed in the forward pass and scaled in the backward pass;
for "none" the backward pass recomputes them with the per-row gradients.

Accumulation: each GEMM accumulates in fp32 and the loss kernel works in fp32.
For fp16/bf16 weights, ``dW`` is summed across chunks in an fp32 buffer (each
chunk's product rounded once) while that buffer is at most ``_FP32_DW_LIMIT``
(1 GiB); for larger heads it is summed in the weight's dtype (``addmm_``: the
GEMM adds each chunk in fp32 and rounds the running sum once per chunk), which
keeps peak extra memory near one chunk of logits plus ``dx`` and ``dW`` (an
fp32 accumulator would add 2 GiB at V=128256, H=4096). ``db`` is summed in fp32.
"""

import math

import torch
from torch import Tensor

from fastml.ops._dispatch import (
    check_float,
    check_same_device,
    differentiable,
    kernel_op,
    opmath,
    use_triton,
)
from fastml.ops.cross_entropy import (
    _cross_entropy_backward_torch,
    _cross_entropy_forward_torch,
    check_target,
    cross_entropy_fused_,
)

# Rows per chunk; None chooses ceil(BT / ceil(V / H)) so a chunk of logits is
# about the size of x. Tests set it to force several chunks on small shapes.
_CHUNK_ROWS: int | None = None

# dW of a half-precision weight is summed across chunks in fp32 while that fp32
# buffer stays within this many bytes; beyond it (V=128256, H=4096 needs 2 GiB)
# it is summed in the weight's dtype, which keeps the peak memory small.
_FP32_DW_LIMIT = 1 << 30


def _chunk_rows(bt: int, h: int, v: int) -> int:
    if _CHUNK_ROWS is not None:
        return max(1, min(bt, _CHUNK_ROWS))
    return max(1, min(bt, math.ceil(bt / math.ceil(v / max(h, 1)))))


def _ce_chunk(logits: Tensor, target: Tensor, scale: Tensor, ignore_index: int, triton: bool):
    """Loss rows of a chunk; overwrites ``logits`` with ``scale * dloss/dlogits``."""
    if triton:
        return cross_entropy_fused_(logits, target, scale, ignore_index, 0.0)
    loss, lse = _cross_entropy_forward_torch(logits, target, ignore_index, 0.0)
    logits.copy_(_cross_entropy_backward_torch(scale, logits, target, lse, ignore_index, 0.0))
    return loss


def _lce_pass(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    row_scale: Tensor,
    want_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One walk over the row chunks: per-row loss and (optionally) gradients.

    ``row_scale`` is the gradient of the loss with respect to each row's loss:
    one element (the same for all rows) or one per row.
    """
    bt, h = x.shape
    v = weight.shape[0]
    triton = use_triton(x)
    loss = torch.empty(bt, dtype=opmath(x), device=x.device)
    gx = torch.empty_like(x) if want_grad else x.new_empty(0)
    fp32_dw = weight.dtype in (torch.float16, torch.bfloat16) and v * h * 4 <= _FP32_DW_LIMIT
    if not want_grad:
        gw = x.new_empty(0)
    elif fp32_dw:
        gw = torch.zeros(v, h, dtype=torch.float32, device=x.device)
    else:
        gw = torch.zeros_like(weight)
    gb = (
        torch.zeros(v, dtype=torch.float32, device=x.device)
        if want_grad and bias is not None
        else x.new_empty(0)
    )
    rows = _chunk_rows(bt, h, v)
    per_row = row_scale.numel() != 1
    for start in range(0, bt, rows):
        end = min(bt, start + rows)
        xc = x[start:end]
        if bias is not None:
            logits = torch.addmm(bias, xc, weight.t())
        else:
            logits = xc @ weight.t()
        scale = row_scale[start:end] if per_row else row_scale.reshape(1)
        loss[start:end] = _ce_chunk(logits, target[start:end], scale, ignore_index, triton)
        if want_grad:
            torch.mm(logits, weight, out=gx[start:end])
            if fp32_dw:
                # Each chunk's product is rounded once, then summed in fp32.
                gw += logits.t() @ xc
            else:
                gw.addmm_(logits.t(), xc)
            if bias is not None:
                gb += logits.sum(0, dtype=torch.float32)
        del logits
    gw = gw.to(weight.dtype) if fp32_dw and want_grad else gw
    gb = gb.to(bias.dtype) if want_grad and bias is not None else gb
    return loss, gx, gw, gb


def _lce_fwd_impl(x, weight, bias, target, ignore_index, reduction, want_grad):
    valid = (target != ignore_index).sum()
    if reduction == "mean":
        scale = (1.0 / valid.to(opmath(x))).reshape(1)
    else:
        scale = torch.ones(1, dtype=opmath(x), device=x.device)
    grads = want_grad and reduction != "none"
    loss, gx, gw, gb = _lce_pass(x, weight, bias, target, ignore_index, scale, grads)
    if reduction == "none":
        return loss, gx, gw, gb
    total = loss.sum()
    return (total / valid if reduction == "mean" else total), gx, gw, gb


def _lce_fwd_fake(x, weight, bias, target, ignore_index, reduction, want_grad):
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=opmath(x))
    if not want_grad or reduction == "none":
        e = x.new_empty(0)
        return loss, e, x.new_empty(0), x.new_empty(0)
    gb = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return loss, torch.empty_like(x), torch.empty_like(weight), gb


@kernel_op("linear_cross_entropy_fwd", _lce_fwd_fake)
def _lce_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    reduction: str,
    want_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _lce_fwd_impl(x, weight, bias, target, ignore_index, reduction, want_grad)


def _lce_bwd_impl(dloss, x, weight, bias, target, ignore_index):
    _loss, gx, gw, gb = _lce_pass(
        x, weight, bias, target, ignore_index, dloss.to(torch.float32).contiguous(), True
    )
    return gx, gw, gb


def _lce_bwd_fake(dloss, x, weight, bias, target, ignore_index):
    gb = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), gb


@kernel_op("linear_cross_entropy_bwd", _lce_bwd_fake)
def _lce_bwd(
    dloss: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return _lce_bwd_impl(dloss, x, weight, bias, target, ignore_index)


def _lce_setup_context(ctx, inputs, output):
    x, weight, bias, target, ignore_index, reduction, _want = inputs
    ctx.ignore_index, ctx.reduction, ctx.has_bias = ignore_index, reduction, bias is not None
    _loss, gx, gw, gb = output
    if reduction == "none":
        ctx.save_for_backward(x, weight, bias, target)
    else:
        ctx.save_for_backward(gx, gw, gb)


def _lce_backward(ctx, dloss, _dgx, _dgw, _dgb):
    if ctx.reduction == "none":
        x, weight, bias, target = ctx.saved_tensors
        gx, gw, gb = _lce_bwd.pick(ctx)(dloss, x, weight, bias, target, ctx.ignore_index)
    else:
        gx, gw, gb = ctx.saved_tensors
        if gx.numel() == 0 and gw.numel() == 0:
            raise RuntimeError(
                "linear_cross_entropy was called with gradients disabled; its backward cannot run"
            )
        gx, gw = gx * dloss.to(gx.dtype), gw * dloss.to(gw.dtype)
        gb = gb * dloss.to(gb.dtype) if ctx.has_bias else None
    return gx, gw, (gb if ctx.has_bias else None), None, None, None, None


_lce_apply = differentiable(
    "_LinearCrossEntropyFunction",
    _lce_fwd,
    _lce_setup_context,
    _lce_backward,
    non_differentiable=(1, 2, 3),
)


def _lce_ref(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """``F.cross_entropy(x @ W.T + b, target)`` with all logits materialised: the reference."""
    logits = torch.nn.functional.linear(x, weight, bias)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, weight.shape[0]),
        target.reshape(-1),
        ignore_index=ignore_index,
        reduction=reduction,
    )


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """``F.cross_entropy(x @ weight.T + bias, target)`` without materialising all logits.

    ``x``: ``(..., H)``; ``weight``: ``(V, H)``; ``bias``: ``(V,)`` or None;
    ``target``: integer ``(...)``. Peak extra memory is one chunk of logits
    (about the size of ``x``) plus the gradients.

    The loss is **float32** for fp32/fp16/bf16 ``x`` (unlike ``F.cross_entropy``,
    which returns ``x``'s dtype; float64 ``x`` gives float64): it is a reduction
    over all rows, accumulated in fp32, and rounding it to bf16 would keep under
    three significant digits (11.9375 for 11.9667 at a Llama LM-head shape).
    Cast it if ``x``'s dtype is needed.
    """
    check_float("x", x)
    check_float("weight", weight)
    if x.dim() < 1:
        raise ValueError("x must have a hidden dimension, got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, {x.shape[-1]}) to match x's last dimension, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (weight.shape[0],) or bias.dtype != x.dtype:
            raise ValueError(
                f"bias must be a ({weight.shape[0]},) {x.dtype} tensor, "
                f"got {tuple(bias.shape)} {bias.dtype}"
            )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_same_device(x=x, weight=weight, bias=bias, target=target)
    h = x.shape[-1]
    t = check_target(target, x.shape[:-1], weight.shape[0], ignore_index)
    x2 = x.reshape(-1, h).contiguous()
    weight = weight.contiguous()
    want_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    args = (x2, weight, bias, t, ignore_index, reduction, want_grad)
    loss = _lce_apply(*args)[0]
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss  # float32: see the docstring
