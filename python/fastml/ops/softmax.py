"""softmax and log_softmax along any dimension, with an online max for long rows.

Rows wider than one block take two passes: the running maximum and the sum of
exponentials rescaled as the maximum grows (online softmax), then the output.
"""

import torch
from torch import Tensor

from fastml.ops._dispatch import (
    as_rows,
    check_float,
    differentiable,
    kernel_op,
    launch_row_tiles,
    launch_split,
    opmath,
    row_block,
    row_split,
    tl,
    triton,
)


@triton.jit
def _softmax_fwd_kernel(
    X,
    Y,
    x_stride,
    y_stride,
    M,
    N,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * x_stride
    y_ptr = Y + row * y_stride
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        # A (ROWS, BLOCK) tile of rows per program (ROWS tuned per shape class);
        # rows past M read as zeros (finite, never stored).
        rows = row * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        m2 = rmask[:, None] & (cols < N)[None, :]
        c2 = cols[None, :]
        x = tl.load(X + rows[:, None] * x_stride + c2, mask=m2, other=-float("inf"))
        x = tl.where(rmask[:, None], x.to(tl.float32), 0.0)
        m = tl.max(x, axis=1)[:, None]
        e = tl.exp(x - m)
        d = tl.sum(e, axis=1)[:, None]
        if LOG:
            y = x - m - tl.log(d)
        else:
            y = e / d
        tl.store(Y + rows[:, None] * y_stride + c2, y.to(Y.dtype.element_ty), mask=m2)
    else:
        m = -float("inf")
        d = 0.0
        for start in range(0, N, BLOCK):
            c = start + cols
            x = tl.load(x_ptr + c, mask=c < N, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # A chunk (so far) of -inf only: keep exp() finite; the sum stays 0.
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
        log_d = tl.log(d)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            x = tl.load(x_ptr + c, mask=mask, other=-float("inf")).to(tl.float32)
            if LOG:
                y = x - m - log_d
            else:
                y = tl.exp(x - m) / d
            tl.store(y_ptr + c, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    DY,
    Y,
    DX,
    dy_stride,
    y_stride,
    dx_stride,
    M,
    N,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    # softmax:     dx = y * (dy - sum(dy * y))
    # log_softmax: dx = dy - exp(y) * sum(dy)
    # A row in one block: each program takes ROWS rows as one (ROWS, BLOCK) tile.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        rows = row * ROWS + tl.arange(0, ROWS)
        m2 = (rows < M)[:, None] & (cols < N)[None, :]
        c2 = cols[None, :]
        dy = tl.load(DY + rows[:, None] * dy_stride + c2, mask=m2, other=0.0).to(tl.float32)
        y = tl.load(Y + rows[:, None] * y_stride + c2, mask=m2, other=0.0).to(tl.float32)
        if LOG:
            dx = dy - tl.exp(y) * tl.sum(dy, axis=1)[:, None]
        else:
            dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
        tl.store(DX + rows[:, None] * dx_stride + c2, dx.to(DX.dtype.element_ty), mask=m2)
    else:
        dy_ptr = DY + row * dy_stride
        y_ptr = Y + row * y_stride
        dx_ptr = DX + row * dx_stride
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            dy = tl.load(dy_ptr + c, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                acc += dy
            else:
                acc += dy * tl.load(y_ptr + c, mask=mask, other=0.0).to(tl.float32)
        s = tl.sum(acc, axis=0)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            dy = tl.load(dy_ptr + c, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + c, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                dx = dy - tl.exp(y) * s
            else:
                dx = y * (dy - s)
            tl.store(dx_ptr + c, dx.to(DX.dtype.element_ty), mask=mask)


# -- long rows, few of them: each row split across programs (see row_split) --


@triton.jit
def _softmax_split_stats_kernel(X, PART, x_stride, N, C, BLOCK: tl.constexpr):
    # Program (row, chunk): the chunk's max and sum of exp(x - max).
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row * x_stride + c, mask=c < N, other=-float("inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)  # a chunk of -inf only: its sum is 0
    tl.store(PART + row * 2 * C + ch, m)
    tl.store(PART + row * 2 * C + C + ch, tl.sum(tl.exp(x - m_safe), axis=0))


@triton.jit
def _softmax_split_fwd_apply_kernel(
    X,
    Y,
    PART,
    x_stride,
    y_stride,
    N,
    C,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
    CBLOCK: tl.constexpr,
):
    # Program (row, chunk): the row's max and sum from its chunks', then its chunk of y.
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    k = tl.arange(0, CBLOCK)
    kmask = k < C
    maxes = tl.load(PART + row * 2 * C + k, mask=kmask, other=-float("inf"))
    sums = tl.load(PART + row * 2 * C + C + k, mask=kmask, other=0.0)
    m = tl.max(maxes, axis=0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    d = tl.sum(sums * tl.exp(maxes - m_safe), axis=0)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    x = tl.load(X + row * x_stride + c, mask=mask, other=-float("inf")).to(tl.float32)
    if LOG:
        y = x - m - tl.log(d)
    else:
        y = tl.exp(x - m) / d
    tl.store(Y + row * y_stride + c, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_split_bwd_dot_kernel(
    DY, Y, PART, dy_stride, y_stride, N, C, LOG: tl.constexpr, BLOCK: tl.constexpr
):
    # Program (row, chunk): the chunk's sum of dy * y (softmax) or of dy (log_softmax).
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    dy = tl.load(DY + row * dy_stride + c, mask=mask, other=0.0).to(tl.float32)
    if not LOG:
        dy = dy * tl.load(Y + row * y_stride + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(PART + row * C + ch, tl.sum(dy, axis=0))


@triton.jit
def _softmax_split_bwd_apply_kernel(
    DY,
    Y,
    DX,
    PART,
    dy_stride,
    y_stride,
    dx_stride,
    N,
    C,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
    CBLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    k = tl.arange(0, CBLOCK)
    s = tl.sum(tl.load(PART + row * C + k, mask=k < C, other=0.0), axis=0)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    dy = tl.load(DY + row * dy_stride + c, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * y_stride + c, mask=mask, other=0.0).to(tl.float32)
    if LOG:
        dx = dy - tl.exp(y) * s
    else:
        dx = y * (dy - s)
    tl.store(DX + row * dx_stride + c, dx.to(DX.dtype.element_ty), mask=mask)


def softmax_forward(x: Tensor, log: bool) -> Tensor:
    """Launch the forward kernel over the last dimension of ``x``."""
    n = x.shape[-1]
    x2 = as_rows(x, n)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    chunks, width = row_split(m, n, x.device)
    if chunks > 1:
        part = torch.empty((m, 2, chunks), dtype=torch.float32, device=x.device)
        launch_split(
            _softmax_split_stats_kernel, (m, chunks), (x2, part, x2.stride(0), n, chunks), width
        )
        launch_split(
            _softmax_split_fwd_apply_kernel, (m, chunks),
            (x2, y, part, x2.stride(0), y.stride(0), n, chunks), width, chunks, LOG=log,
        )  # fmt: skip
    elif m > 0 and n > 0:
        block, one = row_block(n, wide=True)

        launch_row_tiles(
            "softmax_fwd",
            _softmax_fwd_kernel,
            (x2, y, x2.stride(0), y.stride(0), m, n),
            m,
            block,
            one,
            (x.dtype, log),
            x.device,
            LOG=log,
        )
    return y.view(x.shape)


def softmax_backward(dy: Tensor, y: Tensor, log: bool) -> Tensor:
    """Launch the backward kernel over the last dimension."""
    n = y.shape[-1]
    y2, dy2 = as_rows(y, n), as_rows(dy, n)
    m = y2.shape[0]
    dx = torch.empty((m, n), dtype=y.dtype, device=y.device)
    chunks, width = row_split(m, n, y.device)
    if chunks > 1:
        part = torch.empty((m, chunks), dtype=torch.float32, device=y.device)
        launch_split(
            _softmax_split_bwd_dot_kernel, (m, chunks),
            (dy2, y2, part, dy2.stride(0), y2.stride(0), n, chunks), width, LOG=log,
        )  # fmt: skip
        launch_split(
            _softmax_split_bwd_apply_kernel, (m, chunks),
            (dy2, y2, dx, part, dy2.stride(0), y2.stride(0), dx.stride(0), n, chunks),
            width, chunks, LOG=log,
        )  # fmt: skip
    elif m > 0 and n > 0:
        block, one = row_block(n, wide=True)

        launch_row_tiles(
            "softmax_bwd",
            _softmax_bwd_kernel,
            (dy2, y2, dx, dy2.stride(0), y2.stride(0), dx.stride(0), m, n),
            m,
            block,
            one,
            (y.dtype, log),
            y.device,
            LOG=log,
        )
    return dx.view(y.shape)


def _softmax_forward_torch(x: Tensor, log: bool) -> Tensor:
    xf = x.to(opmath(x))
    y = torch.log_softmax(xf, -1) if log else torch.softmax(xf, -1)
    return y.to(x.dtype).contiguous()


def _softmax_backward_torch(dy: Tensor, y: Tensor, log: bool) -> Tensor:
    a = opmath(y)
    dyf, yf = dy.to(a), y.to(a)
    if log:
        dx = dyf - yf.exp() * dyf.sum(-1, keepdim=True)
    else:
        dx = yf * (dyf - (dyf * yf).sum(-1, keepdim=True))
    return dx.to(y.dtype).contiguous()


def _softmax_ref(x: Tensor, dim: int = -1) -> Tensor:
    """exp(x - max) / sum(exp(x - max)) in ``x``'s own dtype: the test reference."""
    e = (x - x.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)


def _log_softmax_ref(x: Tensor, dim: int = -1) -> Tensor:
    z = x - x.amax(dim, keepdim=True)
    return z - z.exp().sum(dim, keepdim=True).log()


# -- custom ops: opaque to torch.compile, with fake implementations and autograd --


def _softmax_fwd_fake(x, log):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@kernel_op("softmax_fwd", _softmax_fwd_fake, softmax_forward, _softmax_forward_torch)
def _softmax_fwd(x: Tensor, log: bool) -> Tensor: ...


def _softmax_bwd_fake(dy, y, log):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@kernel_op("softmax_bwd", _softmax_bwd_fake, softmax_backward, _softmax_backward_torch, key=1)
def _softmax_bwd(dy: Tensor, y: Tensor, log: bool) -> Tensor: ...


def _sm_setup_context(ctx, inputs, output):
    ctx.log = inputs[1]
    ctx.save_for_backward(output)


def _sm_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return _softmax_bwd.pick(ctx)(dy, y, ctx.log), None


_softmax_apply = differentiable("_SoftmaxFunction", _softmax_fwd, _sm_setup_context, _sm_backward)


def _along(x: Tensor, dim: int, log: bool) -> Tensor:
    check_float("x", x)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if x.dim() == 0:
        return _softmax_apply(x.reshape(1), log).reshape(())
    if not -x.dim() <= dim < x.dim():
        raise IndexError(
            f"dim must be in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-D x, got {dim}"
        )
    dim = dim % x.dim()
    if dim == x.dim() - 1:
        return _softmax_apply(x, log)
    # The kernels reduce along a unit-stride row: move dim last (one copy), then back.
    y = _softmax_apply(x.movedim(dim, -1).contiguous(), log)
    return y.movedim(-1, dim)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Softmax along ``dim`` (fp32 accumulation, output in ``x``'s dtype)."""
    return _along(x, dim, False)


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Log-softmax along ``dim`` (fp32 accumulation, output in ``x``'s dtype)."""
    return _along(x, dim, True)
