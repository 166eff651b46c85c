"""Cross entropy over the last dimension with ignore_index and label smoothing.

The kernel reads a row of logits in chunks with an online log-sum-exp, so the
vocabulary size has no cliff; it can also overwrite the logits with their
gradient in the same launch, which is how ``linear_cross_entropy`` avoids ever
holding more than one chunk of logits.

Per row (``C`` classes, smoothing ``e``, target ``t``)::

    loss = (1 - e) * (lse - x[t]) + e * (lse - sum(x) / C)
    dx   = g * (softmax(x) - e / C - (1 - e) * onehot(t))

and 0 for rows whose target is ``ignore_index``; ``reduction="mean"`` divides
by the number of rows that are not ignored, like ``F.cross_entropy``.
"""

import torch
from torch import Tensor

from fastml.ops._dispatch import (
    as_rows,
    check_float,
    compiling,
    differentiable,
    kernel_op,
    launch_config,
    launch_split,
    next_pow2,
    num_warps,
    opmath,
    row_block,
    row_split,
    tl,
    triton,
    use_triton,
)


@triton.jit
def _cross_entropy_kernel(
    X,
    T,
    LOSS,
    LSE,
    VALID,
    G,
    DX,
    COUNT,
    x_stride,
    g_stride,
    dx_stride,
    C,
    ignore_index,
    smoothing,
    HAS_LSE: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    WRITE_VALID: tl.constexpr,
    DIV_COUNT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * x_stride
    dx_ptr = DX + row * dx_stride
    cols = tl.arange(0, BLOCK)
    t = tl.load(T + row).to(tl.int64)
    # A target outside [0, C) (and not ignore_index) is never read through: the
    # row counts as ignored and VALID flags it (-2**30, so the sum of VALID is
    # negative), which the caller turns into one asynchronous device assert.
    if (t == ignore_index) | (t < 0) | (t >= C):
        if WRITE_LOSS:
            tl.store(LOSS + row, 0.0)
            tl.store(LSE + row, 0.0)
        if WRITE_VALID:
            tl.store(VALID + row, tl.where(t == ignore_index, 0, -1073741824).to(tl.int32))
        if WRITE_GRAD:
            for start in range(0, C, BLOCK):
                c = start + cols
                tl.store(dx_ptr + c, tl.zeros([BLOCK], dtype=DX.dtype.element_ty), mask=c < C)
        return
    if HAS_LSE:
        lse = tl.load(LSE + row)
        sum_x = 0.0
    else:
        m = -float("inf")
        d = 0.0
        sum_x = 0.0
        for start in range(0, C, BLOCK):
            c = start + cols
            mask = c < C
            x = tl.load(x_ptr + c, mask=mask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
        lse = m + tl.log(d)
    if WRITE_VALID:
        tl.store(VALID + row, 1)
    if WRITE_LOSS:
        # Read x[t] before the gradient pass may overwrite it (DX may alias X).
        x_t = tl.load(x_ptr + t).to(tl.float32)
        # Two non-negative terms: no cancellation (with one class the loss is exactly 0).
        loss = (1.0 - smoothing) * (lse - x_t) + smoothing * (lse - sum_x / C)
        tl.store(LOSS + row, loss)
        tl.store(LSE + row, lse)
    if WRITE_GRAD:
        g = tl.load(G + row * g_stride).to(tl.float32)
        if DIV_COUNT:  # reduction="mean": the upstream gradient over the counted rows
            g = g / tl.load(COUNT)
        for start in range(0, C, BLOCK):
            c = start + cols
            mask = c < C
            x = tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - smoothing / C
            grad = tl.where(c == t, grad - (1.0 - smoothing), grad)
            tl.store(dx_ptr + c, (g * grad).to(DX.dtype.element_ty), mask=mask)


# -- long rows, few of them: each row split across programs (see row_split) --


@triton.jit
def _ce_split_stats_kernel(X, PART, x_stride, C, K, BLOCK: tl.constexpr):
    # Program (row, chunk): the chunk's max, sum of exp(x - max) and sum of x.
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    x = tl.load(X + row * x_stride + c, mask=mask, other=-float("inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    base = PART + row * 3 * K
    tl.store(base + ch, m)
    tl.store(base + K + ch, tl.sum(tl.exp(x - m_safe), axis=0))
    tl.store(base + 2 * K + ch, tl.sum(tl.where(mask, x, 0.0), axis=0))


@triton.jit
def _ce_split_loss_kernel(
    X, T, PART, LOSS, LSE, VALID, x_stride, C, K, ignore_index, smoothing, KBLOCK: tl.constexpr
):
    # Program row: lse from the chunks' partials (in chunk order), then the loss.
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row).to(tl.int64)
    if (t == ignore_index) | (t < 0) | (t >= C):
        tl.store(LOSS + row, 0.0)
        tl.store(LSE + row, 0.0)
        tl.store(VALID + row, tl.where(t == ignore_index, 0, -1073741824).to(tl.int32))
        return
    k = tl.arange(0, KBLOCK)
    kmask = k < K
    base = PART + row * 3 * K
    maxes = tl.load(base + k, mask=kmask, other=-float("inf"))
    sums = tl.load(base + K + k, mask=kmask, other=0.0)
    m = tl.max(maxes, axis=0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    lse = m + tl.log(tl.sum(sums * tl.exp(maxes - m_safe), axis=0))
    sum_x = tl.sum(tl.load(base + 2 * K + k, mask=kmask, other=0.0), axis=0)
    x_t = tl.load(X + row * x_stride + t).to(tl.float32)
    loss = (1.0 - smoothing) * (lse - x_t) + smoothing * (lse - sum_x / C)
    tl.store(VALID + row, 1)
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)


@triton.jit
def _ce_split_grad_kernel(
    X,
    T,
    LSE,
    G,
    DX,
    COUNT,
    x_stride,
    g_stride,
    dx_stride,
    C,
    ignore_index,
    smoothing,
    DIV_COUNT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Program (row, chunk): the chunk of the row's gradient (no reduction needed).
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    t = tl.load(T + row).to(tl.int64)
    if (t == ignore_index) | (t < 0) | (t >= C):
        tl.store(DX + row * dx_stride + c, tl.zeros([BLOCK], dtype=DX.dtype.element_ty), mask=mask)
        return
    lse = tl.load(LSE + row)
    g = tl.load(G + row * g_stride).to(tl.float32)
    if DIV_COUNT:
        g = g / tl.load(COUNT)
    x = tl.load(X + row * x_stride + c, mask=mask, other=0.0).to(tl.float32)
    grad = tl.exp(x - lse) - smoothing / C
    grad = tl.where(c == t, grad - (1.0 - smoothing), grad)
    tl.store(DX + row * dx_stride + c, (g * grad).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _ce_reduce_kernel(LOSS, VALID, OUT, COUNT, OK, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    # One program: the rows' validity (OK: no target out of range) and, for
    # MODE 1 / 2, the sum / mean of the per-row losses over the counted rows
    # (the mean's divisor also to COUNT, for the backward). Blocks in order, so
    # the result is deterministic.
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        idx = start + offs
        mask = idx < n
        v = tl.load(VALID + idx, mask=mask, other=0)
        cnt += tl.maximum(v, 0)
        bad += (v < 0).to(tl.int32)
        if MODE != 0:
            acc += tl.load(LOSS + idx, mask=mask, other=0.0)
    tl.store(OK, (tl.sum(bad, axis=0) == 0).to(tl.int32))
    if MODE == 1:
        tl.store(OUT, tl.sum(acc, axis=0).to(OUT.dtype.element_ty))
    if MODE == 2:
        count = tl.sum(cnt, axis=0).to(tl.float32)
        # Every row ignored: 0 / 0 = nan, as F.cross_entropy (without dividing by 0).
        mean = tl.where(count > 0, tl.sum(acc, axis=0) / tl.maximum(count, 1.0), float("nan"))
        tl.store(OUT, mean.to(OUT.dtype.element_ty))
        tl.store(COUNT, count)


def cross_entropy_reduce(
    loss: Tensor, valid: Tensor, mode: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, count, ok)`` of the forward's per-row ``loss`` and ``valid`` in one
    launch: ``out`` the sum (``mode`` 1) or mean (2) in ``dtype``, ``count`` the
    mean's divisor (fp32), ``ok`` 1 when no target was out of range (int32)."""
    out = torch.empty((), dtype=dtype, device=loss.device)
    count = torch.empty((), dtype=torch.float32, device=loss.device)
    ok = torch.empty((), dtype=torch.int32, device=loss.device)
    _ce_reduce_kernel[(1,)](
        loss, valid, out, count, ok, loss.shape[0], MODE=mode, BLOCK=1024, num_warps=4
    )
    return out, count, ok


def _ce_block(c: int) -> int:
    block, _ = row_block(c)
    # The kernel walks a row in chunks anyway; past 4096 classes a wider block
    # only costs registers.
    return min(block, 4096)


def _launch_ce(name: str, logits: Tensor, args: tuple, tune: bool, **constexprs) -> None:
    """One program per row of ``_cross_entropy_kernel``, its (block, warps) tuned
    per (dtype, classes) when the launch is repeatable (``tune``)."""
    n, c = logits.shape

    def launch(config: tuple[int, int]) -> None:
        block, warps = config
        _cross_entropy_kernel[(n,)](*args, BLOCK=block, num_warps=warps, **constexprs)

    candidates = _ce_candidates(c) if tune else _ce_candidates(c)[:1]
    launch(launch_config(name, logits.device, (logits.dtype, c), candidates, launch))


def _ce_candidates(c: int) -> list[tuple[int, int]]:
    """(block, warps) for the cross-entropy kernel: the default first, then the
    same block at half / twice the warps and, for wide rows, blocks of 8,192 and
    16,384 columns (fewer chunks per row, more bytes in flight)."""
    block = _ce_block(c)
    out = [(block, num_warps(block)), (block, max(4, num_warps(block) // 2))]
    out.append((block, min(16, 2 * num_warps(block))))
    wide, _ = row_block(c, wide=True)
    for b in (8192, 16384):
        if block < b <= wide:
            out.append((b, 16))
    return list(dict.fromkeys(out))


def cross_entropy_forward(
    logits: Tensor, target: Tensor, ignore_index: int, smoothing: float, grad_in_place: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss and log-sum-exp (fp32) of 2-D ``logits``, and per-row
    validity (int32: 1 counted, 0 ignored, -2**30 target out of range).
    ``grad_in_place``: also overwrite ``logits`` with d loss_row / d logits
    (unscaled) in the same pass (one program per row)."""
    n, c = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    valid = torch.empty(n, dtype=torch.int32, device=logits.device)
    chunks, width = (1, 0) if grad_in_place else row_split(n, c, logits.device)
    if chunks > 1:
        part = torch.empty((n, 3, chunks), dtype=torch.float32, device=logits.device)
        launch_split(
            _ce_split_stats_kernel, (n, chunks), (logits, part, logits.stride(0), c, chunks), width
        )
        _ce_split_loss_kernel[(n,)](
            logits,
            target,
            part,
            loss,
            lse,
            valid,
            logits.stride(0),
            c,
            chunks,
            ignore_index,
            smoothing,
            KBLOCK=next_pow2(chunks),
        )
    elif n > 0:
        one = torch.ones(1, dtype=torch.float32, device=logits.device) if grad_in_place else loss

        _launch_ce(
            "cross_entropy_fwd",
            logits,
            (logits, target, loss, lse, valid, one, logits, lse,
             logits.stride(0), 0, logits.stride(0), c, ignore_index, smoothing),
            tune=not grad_in_place,  # the gradient overwrites the logits: not repeatable
            HAS_LSE=False,
            WRITE_LOSS=True,
            WRITE_GRAD=grad_in_place,
            WRITE_VALID=True,
            DIV_COUNT=False,
        )  # fmt: skip
    return loss, lse, valid


def cross_entropy_backward(
    dloss: Tensor,
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    ignore_index: int,
    smoothing: float,
    out: Tensor | None = None,
    count: Tensor | None = None,
) -> Tensor:
    """Gradient of the per-row loss, scaled row by row by ``dloss`` (stride 0
    allowed), and divided by ``count`` (a device scalar) when given."""
    n, c = logits.shape
    dx = torch.empty_like(logits, memory_format=torch.contiguous_format) if out is None else out
    chunks, width = row_split(n, c, logits.device)
    if chunks > 1:
        launch_split(
            _ce_split_grad_kernel, (n, chunks),
            (logits, target, lse, dloss, dx, lse if count is None else count, logits.stride(0),
             dloss.stride(0) if dloss.dim() else 0, dx.stride(0), c, ignore_index, smoothing),
            width, DIV_COUNT=count is not None,
        )  # fmt: skip
    elif n > 0:
        _launch_ce(
            "cross_entropy_bwd",
            logits,
            (logits, target, lse, lse, lse, dloss, dx, lse if count is None else count,
             logits.stride(0), dloss.stride(0) if dloss.dim() else 0, dx.stride(0), c,
             ignore_index, smoothing),
            tune=out is None,  # a caller's buffer may alias the logits: not repeatable
            HAS_LSE=True,
            WRITE_LOSS=False,
            WRITE_GRAD=True,
            WRITE_VALID=False,
            DIV_COUNT=count is not None,
        )  # fmt: skip
    return dx


def cross_entropy_fused_(
    logits: Tensor, target: Tensor, scale: Tensor, ignore_index: int, smoothing: float
) -> Tensor:
    """Per-row loss of 2-D ``logits``; overwrites ``logits`` with ``scale * dloss/dlogits``.

    ``scale`` holds one element (all rows) or one per row; it is read on the device.
    """
    n, c = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n > 0:
        block = _ce_block(c)
        _cross_entropy_kernel[(n,)](
            logits,
            target,
            loss,
            lse,
            lse,
            scale,
            logits,
            lse,
            logits.stride(0),
            1 if scale.numel() > 1 else 0,
            logits.stride(0),
            c,
            ignore_index,
            smoothing,
            HAS_LSE=False,
            WRITE_LOSS=True,
            WRITE_GRAD=True,
            WRITE_VALID=False,
            DIV_COUNT=False,
            BLOCK=block,
            num_warps=num_warps(block),
        )
    return loss


# -- torch implementations with the same semantics --


def _cross_entropy_forward_torch(
    logits: Tensor, target: Tensor, ignore_index: int, smoothing: float
) -> tuple[Tensor, Tensor]:
    xf = logits.to(opmath(logits))
    c = xf.shape[-1]
    valid = (target != ignore_index) & (target >= 0) & (target < c)
    lse = torch.logsumexp(xf, -1)
    x_t = xf.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    loss = (1.0 - smoothing) * (lse - x_t)
    if smoothing:
        loss = loss + smoothing * (lse - xf.sum(-1) / c)
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    loss = torch.where(valid, loss, zero)
    lse = torch.where(valid, lse, zero)
    return loss, lse  # float32, or float64 for float64 logits (see opmath)


def _cross_entropy_backward_torch(
    dloss: Tensor,
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    ignore_index: int,
    smoothing: float,
) -> Tensor:
    a = opmath(logits)
    xf = logits.to(a)
    c = xf.shape[-1]
    valid = target != ignore_index
    grad = torch.exp(xf - lse.to(a).unsqueeze(-1)) - smoothing / c
    onehot = torch.zeros_like(grad).scatter_(-1, torch.where(valid, target, 0).unsqueeze(-1), 1.0)
    grad = grad - (1.0 - smoothing) * onehot
    scale = dloss.to(a).expand(target.shape) * valid
    return (grad * scale.unsqueeze(-1)).to(logits.dtype).contiguous()


def _cross_entropy_ref(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """``F.cross_entropy`` with the class dimension last: the test reference."""
    c = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, c),
        target.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    ).reshape(target.shape if reduction == "none" else ())


def _row_validity(target: Tensor, classes: int, ignore_index: int) -> Tensor:
    """The kernel's VALID for the torch path: 1 counted, 0 ignored, -2**30 out of range."""
    bad = ((target < 0) | (target >= classes)) & (target != ignore_index)
    ok = (target != ignore_index).to(torch.int32)
    return torch.where(bad, torch.full_like(ok, -(2**30)), ok)


# -- custom ops: opaque to torch.compile, with fake implementations and autograd --


def _ce_forward_torch(logits, target, ignore_index, smoothing):
    loss, lse = _cross_entropy_forward_torch(logits, target, ignore_index, smoothing)
    return loss, lse, _row_validity(target, logits.shape[-1], ignore_index)


def _ce_fwd_fake(logits, target, ignore_index, smoothing):
    n = logits.shape[0]
    stat = opmath(logits)
    return (
        logits.new_empty(n, dtype=stat),
        logits.new_empty(n, dtype=stat),
        logits.new_empty(n, dtype=torch.int32),
    )


@kernel_op("cross_entropy_fwd", _ce_fwd_fake, cross_entropy_forward, _ce_forward_torch)
def _ce_fwd(
    logits: Tensor, target: Tensor, ignore_index: int, smoothing: float
) -> tuple[Tensor, Tensor, Tensor]: ...


def _ce_bwd_fake(dloss, logits, target, lse, ignore_index, smoothing):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@kernel_op(
    "cross_entropy_bwd",
    _ce_bwd_fake,
    cross_entropy_backward,
    _cross_entropy_backward_torch,
    key=1,
)
def _ce_bwd(
    dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int, smoothing: float
) -> Tensor: ...


def _ce_setup_context(ctx, inputs, output):
    logits, target, ignore_index, smoothing = inputs
    ctx.ignore_index, ctx.smoothing = ignore_index, smoothing
    ctx.save_for_backward(logits, target, output[1])


def _ce_backward(ctx, dloss, _dlse, _dvalid):
    logits, target, lse = ctx.saved_tensors
    dx = _ce_bwd.pick(ctx)(dloss, logits, target, lse, ctx.ignore_index, ctx.smoothing)
    return dx, None, None, None


_ce_apply = differentiable(
    "_CrossEntropyFunction", _ce_fwd, _ce_setup_context, _ce_backward, non_differentiable=(1, 2)
)


class _CrossEntropyReduced(torch.autograd.Function):
    """reduction="sum" / "mean" on the Triton path, eagerly: the forward kernel,
    one launch that reduces the rows (and checks the targets), and a backward
    that divides the upstream gradient by the count in the gradient kernel —
    three launches and one in the backward, where the per-row Function followed
    by torch's sum, division and cast took seven and five (the op was bound by
    host time up to ~16k rows x 4k classes on an H200)."""

    @staticmethod
    def forward(ctx, x2, t, ignore_index, smoothing, mode, dtype):
        loss, lse, valid = cross_entropy_forward(x2, t, ignore_index, smoothing)
        out, count, ok = cross_entropy_reduce(loss, valid, mode, dtype)
        ctx.save_for_backward(x2, t, lse, count)
        ctx.ignore_index, ctx.smoothing, ctx.mean = ignore_index, smoothing, mode == 2
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(ok)
        return out, ok

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dok):
        if dout is None:
            return None, None, None, None, None, None
        x2, t, lse, count = ctx.saved_tensors
        dx = cross_entropy_backward(
            dout, x2, t, lse, ctx.ignore_index, ctx.smoothing, count=count if ctx.mean else None
        )
        return dx, None, None, None, None, None


class _CrossEntropyGradInLogits(torch.autograd.Function):
    """inplace_grad=True: the forward writes each row's gradient into the
    logits (2-D view ``x2`` of them) and keeps them as its saved state; the
    backward scales them in place by the upstream gradient and returns them."""

    @staticmethod
    def forward(ctx, x2, t, ignore_index, smoothing, base):
        if use_triton(x2):
            loss, _lse, valid = cross_entropy_forward(
                x2, t, ignore_index, smoothing, grad_in_place=True
            )
        else:
            loss, lse = _cross_entropy_forward_torch(x2, t, ignore_index, smoothing)
            ones = torch.ones((), dtype=torch.float32, device=x2.device)
            x2.copy_(_cross_entropy_backward_torch(ones, x2, t, lse, ignore_index, smoothing))
            valid = _row_validity(t, x2.shape[-1], ignore_index)
        # The logits now hold gradients: any autograd node that saved them (an
        # op that keeps its output, e.g. exp or softmax) must fail in its
        # backward rather than read them.
        torch.autograd.graph.increment_version(base)
        ctx.base_shape = base.shape
        ctx.save_for_backward(x2)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(valid)
        return loss, valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss, _dvalid):
        (g,) = ctx.saved_tensors
        if dloss is None:
            return None, None, None, None, None
        rows = dloss.expand(g.shape[0]).to(torch.float32).unsqueeze(-1)
        if g.dtype == torch.float32:
            g.mul_(rows)
        else:  # scaled in fp32, rounded once
            g.copy_(g.float().mul_(rows))
        return None, None, None, None, g.view(ctx.base_shape)


@torch.compiler.disable
def _grad_in_logits(x2, t, ignore_index, smoothing, logits):
    # x2 (the rows of the logits) carries no gradient itself: the gradient goes
    # to `logits`, reshaped.
    return _CrossEntropyGradInLogits.apply(x2.detach(), t, ignore_index, smoothing, logits)


_REDUCTIONS = ("mean", "sum", "none")


def check_target(
    target: Tensor,
    rows_shape: torch.Size,
    classes: int,
    ignore_index: int,
    device_check: bool = True,
) -> Tensor:
    """Validate integer class targets; returns them flattened to int64 rows.

    On CUDA (and while compiling) the range check is an asynchronous device
    assert; ``device_check=False`` leaves it to the caller (cross_entropy's
    kernel flags out-of-range targets itself, saving the check's launches).
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if target.shape != rows_shape:
        raise ValueError(
            f"target must have shape {tuple(rows_shape)} (the logits without their class "
            f"dimension), got {tuple(target.shape)}"
        )
    t = target.reshape(-1).to(torch.int64)
    on_device = t.is_cuda or torch.compiler.is_compiling()
    if on_device and not device_check:
        return t
    bad = ((t < 0) | (t >= classes)) & (t != ignore_index)
    if on_device:
        # An asynchronous device-side check: no host sync on the hot path, no graph break.
        torch._assert_async(~bad.any())
    elif t.numel() and bool(bad.any()):
        v = int(t[bad][0])
        raise IndexError(f"target must be in [0, {classes}) or ignore_index, got {v}")
    return t


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    *,
    inplace_grad: bool = False,
) -> Tensor:
    """Cross entropy of ``logits`` (classes in the last dimension) against class indices.

    ``logits``: ``(..., C)`` fp32/fp16/bf16; ``target``: integer ``(...)``. Same
    semantics as ``F.cross_entropy`` for 2-D logits (``ignore_index``,
    ``label_smoothing`` in [0, 1], ``reduction`` "mean" | "sum" | "none"); the
    result has ``logits``' dtype; accumulation is fp32.

    ``inplace_grad=True`` is for callers that no longer need the logits (an LM
    head's output, say): the forward pass writes the gradient into ``logits``
    itself (one pass over them, no gradient buffer: the memory of a
    ``(tokens, vocab)`` gradient saved), and the backward scales it in place
    and hands that buffer on. The logits' values are gone after the call, and
    an autograd node that saved them (an op that keeps its output, such as
    ``exp`` or ``softmax``) raises in its backward instead of reading the
    gradient. Linear layers and matmuls do not save their output, so
    ``cross_entropy(head(h), t, inplace_grad=True)`` is safe. The gradient is
    rounded to the logits' dtype twice (once stored, once scaled), not once.
    Runs eagerly (a graph break under ``torch.compile``).
    """
    check_float("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits must have a class dimension, got a 0-d tensor")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(inplace_grad, bool):
        raise TypeError(f"inplace_grad must be a bool, got {type(inplace_grad).__name__}")
    c = logits.shape[-1]
    # On CUDA the range check is done by the forward itself (its per-row
    # validity), so a call costs a few launches rather than a dozen.
    t = check_target(target, logits.shape[:-1], c, ignore_index, device_check=False)
    if target.device != logits.device:
        raise ValueError(f"target must be on {logits.device}, got {target.device}")
    x2 = as_rows(logits, c)
    args = (x2, t, ignore_index, float(label_smoothing))
    in_place = inplace_grad and logits.requires_grad and torch.is_grad_enabled()
    if not in_place and not compiling() and use_triton(x2) and x2.shape[0] > 0:
        # Eager Triton path: the reduction and the target check in one launch.
        msg = f"target must be in [0, {c}) or ignore_index"
        if reduction == "none":
            loss, _lse, valid = _ce_apply(*args)
            if t.is_cuda:
                torch._assert_async(cross_entropy_reduce(loss, valid, 0, logits.dtype)[2], msg)
            return loss.reshape(target.shape).to(logits.dtype)
        out, ok = _CrossEntropyReduced.apply(*args, 1 if reduction == "sum" else 2, logits.dtype)
        if t.is_cuda:
            torch._assert_async(ok, msg)
        return out
    if in_place:
        loss, valid = _grad_in_logits(x2, t, ignore_index, float(label_smoothing), logits)
    else:
        loss, _lse, valid = _ce_apply(*args)
    count = valid.sum() if (reduction == "mean" or t.is_cuda or compiling()) else None
    if t.is_cuda or compiling():
        # Negative exactly when a target was out of range (see the kernel).
        torch._assert_async(count >= 0, f"target must be in [0, {c}) or ignore_index")
    if reduction == "none":
        out = loss.reshape(target.shape)
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / count
    return out.to(logits.dtype)
