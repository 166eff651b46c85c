"""LayerNorm over the last dimension, fp32 statistics, chunked for long rows.

Rows wider than one block are reduced chunk by chunk with Chan's parallel
variance update (each chunk's mean and M2 merged into the running ones), so a
long row is read twice in the forward pass (statistics, then output), never
three times, and stays accurate where a sum-of-squares would cancel.
"""

import torch
from torch import Tensor

from fastml.ops._dispatch import (
    as_rows,
    cdiv,
    check_eps,
    check_float,
    check_row_param,
    check_same_device,
    differentiable,
    kernel_op,
    launch_persistent_rows,
    launch_row_tiles,
    launch_split,
    opmath,
    persistent_programs,
    row_block,
    row_split,
    split_groups,
    tl,
    triton,
)


@triton.jit
def _layer_norm_fwd_kernel(
    X,
    W,
    B,
    Y,
    MEAN,
    RSTD,
    x_stride,
    y_stride,
    M,
    N,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * x_stride
    y_ptr = Y + row * y_stride
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        # A (ROWS, BLOCK) tile of rows per program (ROWS tuned per shape class).
        rows = row * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        cmask = cols < N
        m2d = rmask[:, None] & cmask[None, :]
        c2 = cols[None, :]
        x = tl.load(X + rows[:, None] * x_stride + c2, mask=m2d, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        d = tl.where(m2d, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=1) / N + eps)
        y = d * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * y_stride + c2, y.to(Y.dtype.element_ty), mask=m2d)
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)
    else:
        mean = 0.0
        m2 = 0.0
        count = 0.0
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            x = tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32)
            n_b = tl.minimum(N - start, BLOCK).to(tl.float32)
            mean_b = tl.sum(x, axis=0) / n_b
            d = tl.where(mask, x - mean_b, 0.0)
            m2_b = tl.sum(d * d, axis=0)
            total = count + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / total)
            m2 = m2 + m2_b + delta * delta * (count * n_b / total)
            count = total
        rstd = tl.rsqrt(m2 / N + eps)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            x = tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + c, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)


@triton.jit
def _ln_bwd_dots(DY, X, W, row, dy_stride, x_stride, cc, mask, mean, rstd, HAS_W: tl.constexpr):
    """(sum(w dy xhat), sum(w dy)) over one block of a row."""
    dy = tl.load(DY + row * dy_stride + cc, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * x_stride + cc, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    if HAS_W:
        dy = dy * tl.load(W + cc, mask=mask, other=0.0).to(tl.float32)
    return tl.sum(dy * xhat, axis=0), tl.sum(dy, axis=0)


@triton.jit
def _ln_bwd_apply(
    DY,
    X,
    W,
    DX,
    row,
    dy_stride,
    x_stride,
    dx_stride,
    cc,
    mask,
    mean,
    rstd,
    c1,
    c2,
    dw,
    db,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
):
    """dx of one block of a row; returns (dw + dy * xhat, db + dy)."""
    dy = tl.load(DY + row * dy_stride + cc, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * x_stride + cc, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    wdy = dy
    if HAS_W:
        wdy = dy * tl.load(W + cc, mask=mask, other=0.0).to(tl.float32)
        dw += dy * xhat
    if HAS_B:
        db += dy
    dx = (wdy - (xhat * c1 + c2)) * rstd
    tl.store(DX + row * dx_stride + cc, dx.to(DX.dtype.element_ty), mask=mask)
    return dw, db


@triton.jit
def _layer_norm_bwd_kernel(
    DY,
    X,
    W,
    MEAN,
    RSTD,
    DX,
    DW_PARTIAL,
    DB_PARTIAL,
    dy_stride,
    x_stride,
    dx_stride,
    M,
    N,
    rows_per_program,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    TWO_BLOCK: tl.constexpr,
):
    # dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)); dW and dB are
    # summed per program in fp32 (see _rms_norm_bwd_kernel, also for ROWS and
    # TWO_BLOCK).
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK)
    dw_ptr = DW_PARTIAL + pid * N
    db_ptr = DB_PARTIAL + pid * N
    if ONE_BLOCK:
        mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK], dtype=tl.float32)
        tile = tl.arange(0, ROWS)
        for r0 in range(row_start, row_end, ROWS):
            rows = r0 + tile
            rmask = rows < row_end
            m2 = rmask[:, None] & mask[None, :]
            c2d = cols[None, :]
            dy = tl.load(DY + rows[:, None] * dy_stride + c2d, mask=m2, other=0.0).to(tl.float32)
            x = tl.load(X + rows[:, None] * x_stride + c2d, mask=m2, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)[:, None]
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)[:, None]
            xhat = tl.where(m2, (x - mean) * rstd, 0.0)
            wdy = dy
            if HAS_W:
                wdy = dy * w[None, :]
                dw_acc += tl.sum(dy * xhat, axis=0)
            if HAS_B:
                db_acc += tl.sum(dy, axis=0)
            c1 = tl.sum(wdy * xhat, axis=1)[:, None] / N
            c2 = tl.sum(wdy, axis=1)[:, None] / N
            dx = (wdy - (xhat * c1 + c2)) * rstd
            tl.store(DX + rows[:, None] * dx_stride + c2d, dx.to(DX.dtype.element_ty), mask=m2)
        if HAS_W:
            tl.store(dw_ptr + cols, dw_acc, mask=mask)
        if HAS_B:
            tl.store(db_ptr + cols, db_acc, mask=mask)
    elif TWO_BLOCK:
        c1b = BLOCK + cols
        mask0 = cols < N
        mask1 = c1b < N
        dw0 = tl.zeros([BLOCK], dtype=tl.float32)
        dw1 = tl.zeros([BLOCK], dtype=tl.float32)
        db0 = tl.zeros([BLOCK], dtype=tl.float32)
        db1 = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(row_start, row_end):
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            s1a, s2a = _ln_bwd_dots(
                DY, X, W, row, dy_stride, x_stride, cols, mask0, mean, rstd, HAS_W
            )
            s1b, s2b = _ln_bwd_dots(
                DY, X, W, row, dy_stride, x_stride, c1b, mask1, mean, rstd, HAS_W
            )
            c1 = (s1a + s1b) / N
            c2 = (s2a + s2b) / N
            dw0, db0 = _ln_bwd_apply(
                DY, X, W, DX, row, dy_stride, x_stride, dx_stride, cols, mask0,
                mean, rstd, c1, c2, dw0, db0, HAS_W, HAS_B,
            )  # fmt: skip
            dw1, db1 = _ln_bwd_apply(
                DY, X, W, DX, row, dy_stride, x_stride, dx_stride, c1b, mask1,
                mean, rstd, c1, c2, dw1, db1, HAS_W, HAS_B,
            )  # fmt: skip
        if HAS_W:
            tl.store(dw_ptr + cols, dw0, mask=mask0)
            tl.store(dw_ptr + c1b, dw1, mask=mask1)
        if HAS_B:
            tl.store(db_ptr + cols, db0, mask=mask0)
            tl.store(db_ptr + c1b, db1, mask=mask1)
    else:
        for row in range(row_start, row_end):
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            acc1 = tl.zeros([BLOCK], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, N, BLOCK):
                cc = start + cols
                mask = cc < N
                dy = tl.load(DY + row * dy_stride + cc, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * x_stride + cc, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                if HAS_W:
                    dy = dy * tl.load(W + cc, mask=mask, other=0.0).to(tl.float32)
                acc1 += dy * xhat
                acc2 += dy
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            for start in range(0, N, BLOCK):
                cc = start + cols
                mask = cc < N
                dy = tl.load(DY + row * dy_stride + cc, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * x_stride + cc, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                wdy = dy
                if HAS_W:
                    wdy = dy * tl.load(W + cc, mask=mask, other=0.0).to(tl.float32)
                    dw = tl.load(dw_ptr + cc, mask=mask, other=0.0)
                    tl.store(dw_ptr + cc, dw + dy * xhat, mask=mask)
                if HAS_B:
                    db = tl.load(db_ptr + cc, mask=mask, other=0.0)
                    tl.store(db_ptr + cc, db + dy, mask=mask)
                dx = (wdy - (xhat * c1 + c2)) * rstd
                tl.store(DX + row * dx_stride + cc, dx.to(DX.dtype.element_ty), mask=mask)


# -- long rows, few of them: each row split across programs (see row_split) --


@triton.jit
def _ln_split_stats_kernel(X, PART, x_stride, N, C, BLOCK: tl.constexpr):
    # Program (row, chunk): the chunk's mean and M2 (PART[row, 0 or 1, chunk]).
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    x = tl.load(X + row * x_stride + c, mask=mask, other=0.0).to(tl.float32)
    n_b = tl.minimum(N - ch * BLOCK, BLOCK).to(tl.float32)
    mean_b = tl.sum(x, axis=0) / n_b
    d = tl.where(mask, x - mean_b, 0.0)
    tl.store(PART + row * 2 * C + ch, mean_b)
    tl.store(PART + row * 2 * C + C + ch, tl.sum(d * d, axis=0))


@triton.jit
def _ln_split_fwd_apply_kernel(
    X,
    W,
    B,
    Y,
    MEAN,
    RSTD,
    PART,
    x_stride,
    y_stride,
    N,
    C,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
    CBLOCK: tl.constexpr,
):
    # Program (row, chunk): the row's mean and variance from its chunks' (the
    # parallel combination of Chan et al., in chunk order), then its chunk of y.
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    k = tl.arange(0, CBLOCK)
    kmask = k < C
    cnt = tl.where(kmask, tl.minimum(N - k * BLOCK, BLOCK), 0).to(tl.float32)
    means = tl.load(PART + row * 2 * C + k, mask=kmask, other=0.0)
    m2s = tl.load(PART + row * 2 * C + C + k, mask=kmask, other=0.0)
    mean = tl.sum(cnt * means, axis=0) / N
    dm = tl.where(kmask, means - mean, 0.0)
    m2 = tl.sum(m2s, axis=0) + tl.sum(cnt * dm * dm, axis=0)
    rstd = tl.rsqrt(m2 / N + eps)
    if ch == 0:
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    x = tl.load(X + row * x_stride + c, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean) * rstd
    if HAS_W:
        y = y * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * y_stride + c, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _ln_split_bwd_dot_kernel(
    DY, X, W, MEAN, RSTD, PART, dy_stride, x_stride, N, C, HAS_W: tl.constexpr, BLOCK: tl.constexpr
):
    # Program (row, chunk): the chunk's sums of w*dy*xhat and w*dy.
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    dy = tl.load(DY + row * dy_stride + c, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * x_stride + c, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
    if HAS_W:
        dy = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(PART + row * 2 * C + ch, tl.sum(dy * xhat, axis=0))
    tl.store(PART + row * 2 * C + C + ch, tl.sum(dy, axis=0))


@triton.jit
def _ln_split_bwd_apply_kernel(
    DY,
    X,
    W,
    MEAN,
    RSTD,
    DX,
    PART,
    DW_PARTIAL,
    DB_PARTIAL,
    dy_stride,
    x_stride,
    dx_stride,
    M,
    N,
    C,
    rows_per_group,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
    CBLOCK: tl.constexpr,
):
    # Program (chunk, row group): dx for its chunk of each row of the group, and
    # the group's share of dW and dB for the chunk (summed over groups on the host).
    ch = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    k = tl.arange(0, CBLOCK)
    kmask = k < C
    if HAS_W:
        w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = g * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, M)
    for row in range(row_start, row_end):
        c1 = tl.sum(tl.load(PART + row * 2 * C + k, mask=kmask, other=0.0), axis=0) / N
        c2 = tl.sum(tl.load(PART + row * 2 * C + C + k, mask=kmask, other=0.0), axis=0) / N
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        dy = tl.load(DY + row * dy_stride + c, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * x_stride + c, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = dy
        if HAS_W:
            wdy = dy * w
            dw_acc += dy * xhat
        if HAS_B:
            db_acc += dy
        dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * dx_stride + c, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW_PARTIAL + g * N + c, dw_acc, mask=mask)
    if HAS_B:
        tl.store(DB_PARTIAL + g * N + c, db_acc, mask=mask)


def layer_norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel: returns ``(y, mean, rstd)``."""
    n = x.shape[-1]
    x2 = as_rows(x, n)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    chunks, width = row_split(m, n, x.device)
    if chunks > 1:
        part = torch.empty((m, 2, chunks), dtype=torch.float32, device=x.device)
        launch_split(
            _ln_split_stats_kernel, (m, chunks), (x2, part, x2.stride(0), n, chunks), width
        )
        launch_split(
            _ln_split_fwd_apply_kernel, (m, chunks),
            (x2, weight if weight is not None else x2, bias if bias is not None else x2, y,
             mean, rstd, part, x2.stride(0), y.stride(0), n, chunks, eps),
            width, chunks, HAS_W=weight is not None, HAS_B=bias is not None,
        )  # fmt: skip
    elif m > 0 and n > 0:
        block, one = row_block(n, wide=True)

        launch_row_tiles(
            "layer_norm_fwd",
            _layer_norm_fwd_kernel,
            (x2, weight if weight is not None else x2, bias if bias is not None else x2,
             y, mean, rstd, x2.stride(0), y.stride(0), m, n, eps),
            m,
            block,
            one,
            (x.dtype, weight is not None, bias is not None),
            x.device,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
        )  # fmt: skip
    lead = x.shape[:-1]
    return y.view(x.shape), mean.view(lead), rstd.view(lead)


def layer_norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    has_bias: bool,
    mean: Tensor,
    rstd: Tensor,
    bias_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernel: returns ``(dx, dweight, dbias)`` (empty when absent)."""
    n = x.shape[-1]
    x2, dy2 = as_rows(x, n), as_rows(dy, n)
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    has_w = weight is not None
    chunks, width = row_split(m, n, x.device)
    if chunks > 1:
        w_arg = weight if has_w else x2
        part = torch.empty((m, 2, chunks), dtype=torch.float32, device=x.device)
        mean1, rstd1 = mean.reshape(-1), rstd.reshape(-1)
        launch_split(
            _ln_split_bwd_dot_kernel, (m, chunks),
            (dy2, x2, w_arg, mean1, rstd1, part, dy2.stride(0), x2.stride(0), n, chunks),
            width, HAS_W=has_w,
        )  # fmt: skip
        groups, rows_per_group = split_groups(m, chunks, x.device)
        dw_g = torch.empty((groups if has_w else 1, n), dtype=torch.float32, device=x.device)
        db_g = torch.empty((groups if has_bias else 1, n), dtype=torch.float32, device=x.device)
        launch_split(
            _ln_split_bwd_apply_kernel, (chunks, groups),
            (dy2, x2, w_arg, mean1, rstd1, dx, part, dw_g, db_g, dy2.stride(0), x2.stride(0),
             dx.stride(0), m, n, chunks, rows_per_group),
            width, chunks, HAS_W=has_w, HAS_B=has_bias,
        )  # fmt: skip
        dw = dw_g.sum(0).to(weight.dtype) if has_w else x.new_empty(0)
        db = db_g.sum(0).to(bias_dtype) if has_bias else x.new_empty(0)
        return dx.view(x.shape), dw, db
    programs = persistent_programs(m, x.device, n)
    dw_part = torch.zeros((programs if has_w else 1, n), dtype=torch.float32, device=x.device)
    db_part = torch.zeros((programs if has_bias else 1, n), dtype=torch.float32, device=x.device)
    if m > 0 and n > 0:
        block, one = row_block(n)
        programs = launch_persistent_rows(
            "layer_norm_bwd",
            _layer_norm_bwd_kernel,
            lambda grid: (
                dy2, x2, weight if has_w else x2, mean.reshape(-1), rstd.reshape(-1), dx,
                dw_part, db_part, dy2.stride(0), x2.stride(0), dx.stride(0), m, n, cdiv(m, grid),
            ),
            m,
            n,
            block,
            one,
            (x.dtype, has_w, has_bias),
            x.device,
            HAS_W=has_w,
            HAS_B=has_bias,
            TWO_BLOCK=not one and n <= 2 * block,
        )  # fmt: skip
        if has_w:
            dw_part = dw_part[:programs]
        if has_bias:
            db_part = db_part[:programs]
    dw = dw_part.sum(0).to(weight.dtype) if has_w else x.new_empty(0)
    db = db_part.sum(0).to(bias_dtype) if has_bias else x.new_empty(0)
    return dx.view(x.shape), dw, db


def _layer_norm_forward_torch(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    # torch's fused kernel on fp32 (fp64) copies: the same fp32 statistics as the
    # Triton kernel (on half inputs it would return half mean/rstd).
    acc = opmath(x)
    n = x.shape[-1]
    wf = weight.to(acc) if weight is not None else None
    bf = bias.to(acc) if bias is not None else None
    y, mean, rstd = torch.native_layer_norm(x.to(acc), (n,), wf, bf, eps)
    lead = x.shape[:-1]
    return (
        y.to(x.dtype).contiguous(),
        mean.reshape(lead).to(torch.float32),
        rstd.reshape(lead).to(torch.float32),
    )


def _layer_norm_backward_torch(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    has_bias: bool,
    mean: Tensor,
    rstd: Tensor,
    bias_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    acc = opmath(x)
    n = x.shape[-1]
    stats_shape = (*x.shape[:-1], 1)
    wf = weight.to(acc) if weight is not None else None
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy.to(acc),
        x.to(acc),
        [n],
        mean.to(acc).reshape(stats_shape),
        rstd.to(acc).reshape(stats_shape),
        wf,
        torch.zeros(n, dtype=acc, device=x.device) if has_bias else None,
        [True, weight is not None, has_bias],
    )
    dw = dw.to(weight.dtype) if weight is not None else x.new_empty(0)
    db = db.to(bias_dtype) if has_bias else x.new_empty(0)
    return dx.to(x.dtype).contiguous(), dw, db


def _layer_norm_ref(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5
) -> Tensor:
    """Plain torch LayerNorm in ``x``'s own dtype, differentiable: the test reference."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


# -- custom ops: opaque to torch.compile, with fake implementations and autograd --


def _ln_fwd_fake(x, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        stats,
        torch.empty_like(stats),
    )


@kernel_op("layer_norm_fwd", _ln_fwd_fake, layer_norm_forward, _layer_norm_forward_torch)
def _ln_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]: ...


def _ln_bwd_fake(dy, x, weight, has_bias, mean, rstd, bias_dtype):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = x.new_empty(x.shape[-1], dtype=bias_dtype) if has_bias else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw, db


@kernel_op("layer_norm_bwd", _ln_bwd_fake, layer_norm_backward, _layer_norm_backward_torch, key=1)
def _ln_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    has_bias: bool,
    mean: Tensor,
    rstd: Tensor,
    bias_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]: ...


def _ln_setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else x.dtype
    ctx.save_for_backward(x, weight, mean, rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    bwd = _ln_bwd.pick(ctx)
    dx, dw, db = bwd(dy, x, weight, ctx.has_bias, mean, rstd, ctx.bias_dtype)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None


_ln_apply = differentiable(
    "_LayerNormFunction", _ln_fwd, _ln_setup_context, _ln_backward, non_differentiable=(1, 2)
)


def layer_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """LayerNorm over the last dimension: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Any leading shape; fp32/fp16/bf16 in, the same dtype out, fp32 statistics.
    ``weight`` and ``bias`` (shape ``(x.shape[-1],)``) may each be None.
    """
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    check_row_param("weight", weight, x)
    check_row_param("bias", bias, x)
    check_same_device(x=x, weight=weight, bias=bias)
    check_eps(eps)
    return _ln_apply(x, weight, bias, float(eps))[0]
