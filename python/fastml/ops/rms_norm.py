"""RMSNorm and the fused residual-add + RMSNorm.

``y = x / sqrt(mean(x**2) + eps) * weight``, computed in fp32 and stored in
``x``'s dtype. ``add_rms_norm`` first forms ``s = x + residual`` (rounded to
the dtype, as the residual stream is stored) and normalises ``s``; it returns
``(normed, s)`` from one pass over memory.
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
def _rms_norm_fwd_kernel(
    X,
    R,
    S,
    W,
    Y,
    RSTD,
    x_stride,
    r_stride,
    s_stride,
    y_stride,
    M,
    N,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
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
        m2 = (rows < M)[:, None] & (cols < N)[None, :]
        c2 = cols[None, :]
        x = tl.load(X + rows[:, None] * x_stride + c2, mask=m2, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + rows[:, None] * r_stride + c2, mask=m2, other=0.0).to(tl.float32)
            s = (x + r).to(S.dtype.element_ty)
            tl.store(S + rows[:, None] * s_stride + c2, s, mask=m2)
            x = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        tl.store(RSTD + rows, rstd, mask=rows < M)
        y = x * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * y_stride + c2, y.to(Y.dtype.element_ty), mask=m2)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            x = tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                r = tl.load(R + row * r_stride + c, mask=mask, other=0.0).to(tl.float32)
                s = (x + r).to(S.dtype.element_ty)
                tl.store(S + row * s_stride + c, s, mask=mask)
                x = s.to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            if HAS_RES:
                x = tl.load(S + row * s_stride + c, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32)
            y = x * rstd
            if HAS_W:
                y = y * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + c, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd_dot(DY, X, W, row, dy_stride, x_stride, cc, mask, HAS_W: tl.constexpr):
    """sum(dy * w * x) over one block of a row."""
    dy = tl.load(DY + row * dy_stride + cc, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * x_stride + cc, mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        dy = dy * tl.load(W + cc, mask=mask, other=0.0).to(tl.float32)
    return tl.sum(dy * x, axis=0)


@triton.jit
def _rms_bwd_apply(
    DY,
    X,
    W,
    DRES,
    DX,
    row,
    dy_stride,
    x_stride,
    dres_stride,
    dx_stride,
    cc,
    mask,
    rstd,
    c,
    dw,
    HAS_W: tl.constexpr,
    HAS_DRES: tl.constexpr,
):
    """dx of one block of a row (c: the row's mean(dy * w * xhat)); returns dw + dy * xhat."""
    dy = tl.load(DY + row * dy_stride + cc, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * x_stride + cc, mask=mask, other=0.0).to(tl.float32)
    xhat = x * rstd
    wdy = dy
    if HAS_W:
        wdy = dy * tl.load(W + cc, mask=mask, other=0.0).to(tl.float32)
        dw += dy * xhat
    dx = (wdy - xhat * c) * rstd
    if HAS_DRES:
        dx += tl.load(DRES + row * dres_stride + cc, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + row * dx_stride + cc, dx.to(DX.dtype.element_ty), mask=mask)
    return dw


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DRES,
    DX,
    DW_PARTIAL,
    dy_stride,
    x_stride,
    dres_stride,
    dx_stride,
    M,
    N,
    rows_per_program,
    HAS_W: tl.constexpr,
    HAS_DRES: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    TWO_BLOCK: tl.constexpr,
):
    # Each program walks a contiguous range of rows and keeps its share of
    # dW in fp32 (registers when a row fits one or two blocks, else its own row
    # of DW_PARTIAL); the host sums the partials: deterministic, no atomics.
    # When a row fits one block, ROWS rows are taken per iteration as one
    # (ROWS, BLOCK) tile, so several rows' loads are in flight at once.
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK)
    dw_ptr = DW_PARTIAL + pid * N
    if ONE_BLOCK:
        mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        tile = tl.arange(0, ROWS)
        for r0 in range(row_start, row_end, ROWS):
            rows = r0 + tile
            rmask = rows < row_end
            m2 = rmask[:, None] & mask[None, :]
            c2 = cols[None, :]
            dy = tl.load(DY + rows[:, None] * dy_stride + c2, mask=m2, other=0.0).to(tl.float32)
            x = tl.load(X + rows[:, None] * x_stride + c2, mask=m2, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)[:, None]
            xhat = x * rstd
            wdy = dy
            if HAS_W:
                wdy = dy * w[None, :]
                dw_acc += tl.sum(dy * xhat, axis=0)
            c = tl.sum(wdy * xhat, axis=1)[:, None] / N
            dx = (wdy - xhat * c) * rstd
            if HAS_DRES:
                dres = tl.load(DRES + rows[:, None] * dres_stride + c2, mask=m2, other=0.0)
                dx += dres.to(tl.float32)
            tl.store(DX + rows[:, None] * dx_stride + c2, dx.to(DX.dtype.element_ty), mask=m2)
        if HAS_W:
            tl.store(dw_ptr + cols, dw_acc, mask=mask)
    elif TWO_BLOCK:
        # BLOCK < N <= 2 * BLOCK (e.g. 16,384 columns in blocks of 8,192): holding
        # the row and both blocks' dW spills registers, so each row is read twice
        # (its dot product, then dx) with both dW accumulators kept in registers
        # across the program's rows, instead of a read-modify-write of
        # DW_PARTIAL per row (the general path below).
        c1 = BLOCK + cols
        mask0 = cols < N
        mask1 = c1 < N
        dw0 = tl.zeros([BLOCK], dtype=tl.float32)
        dw1 = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            dot = _rms_bwd_dot(DY, X, W, row, dy_stride, x_stride, cols, mask0, HAS_W)
            dot += _rms_bwd_dot(DY, X, W, row, dy_stride, x_stride, c1, mask1, HAS_W)
            c = dot * rstd / N
            dw0 = _rms_bwd_apply(
                DY, X, W, DRES, DX, row, dy_stride, x_stride, dres_stride, dx_stride,
                cols, mask0, rstd, c, dw0, HAS_W, HAS_DRES,
            )  # fmt: skip
            dw1 = _rms_bwd_apply(
                DY, X, W, DRES, DX, row, dy_stride, x_stride, dres_stride, dx_stride,
                c1, mask1, rstd, c, dw1, HAS_W, HAS_DRES,
            )  # fmt: skip
        if HAS_W:
            tl.store(dw_ptr + cols, dw0, mask=mask0)
            tl.store(dw_ptr + c1, dw1, mask=mask1)
    else:
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, N, BLOCK):
                cc = start + cols
                mask = cc < N
                dy = tl.load(DY + row * dy_stride + cc, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * x_stride + cc, mask=mask, other=0.0).to(tl.float32)
                if HAS_W:
                    dy = dy * tl.load(W + cc, mask=mask, other=0.0).to(tl.float32)
                acc += dy * x
            c = tl.sum(acc, axis=0) * rstd / N
            for start in range(0, N, BLOCK):
                cc = start + cols
                mask = cc < N
                dy = tl.load(DY + row * dy_stride + cc, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * x_stride + cc, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd
                wdy = dy
                if HAS_W:
                    wdy = dy * tl.load(W + cc, mask=mask, other=0.0).to(tl.float32)
                    dw = tl.load(dw_ptr + cc, mask=mask, other=0.0)
                    tl.store(dw_ptr + cc, dw + dy * xhat, mask=mask)
                dx = (wdy - xhat * c) * rstd
                if HAS_DRES:
                    dx += tl.load(DRES + row * dres_stride + cc, mask=mask, other=0.0).to(
                        tl.float32
                    )
                tl.store(DX + row * dx_stride + cc, dx.to(DX.dtype.element_ty), mask=mask)


# -- long rows, few of them: each row split across programs (see row_split) --


@triton.jit
def _rms_split_sumsq_kernel(
    X,
    R,
    S,
    PART,
    x_stride,
    r_stride,
    s_stride,
    N,
    C,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Program (row, chunk): the chunk's sum of squares (and s = x + r stored).
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    x = tl.load(X + row * x_stride + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * r_stride + c, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + row * s_stride + c, s, mask=mask)
        x = s.to(tl.float32)
    tl.store(PART + row * C + ch, tl.sum(x * x, axis=0))


@triton.jit
def _rms_split_fwd_apply_kernel(
    X,
    W,
    Y,
    RSTD,
    PART,
    x_stride,
    y_stride,
    N,
    C,
    eps,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
    CBLOCK: tl.constexpr,
):
    # Program (row, chunk): the row's rstd from its chunks' sums (in chunk
    # order, the same in every program of the row), then its chunk of y.
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    k = tl.arange(0, CBLOCK)
    part = tl.load(PART + row * C + k, mask=k < C, other=0.0)
    rstd = tl.rsqrt(tl.sum(part, axis=0) / N + eps)
    if ch == 0:
        tl.store(RSTD + row, rstd)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    y = tl.load(X + row * x_stride + c, mask=mask, other=0.0).to(tl.float32) * rstd
    if HAS_W:
        y = y * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * y_stride + c, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_split_bwd_dot_kernel(
    DY,
    X,
    W,
    PART,
    dy_stride,
    x_stride,
    N,
    C,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Program (row, chunk): the chunk's sum of (dy * w) * x.
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    dy = tl.load(DY + row * dy_stride + c, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * x_stride + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        dy = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(PART + row * C + ch, tl.sum(dy * x, axis=0))


@triton.jit
def _rms_split_bwd_apply_kernel(
    DY,
    X,
    W,
    RSTD,
    DRES,
    DX,
    PART,
    DW_PARTIAL,
    dy_stride,
    x_stride,
    dres_stride,
    dx_stride,
    M,
    N,
    C,
    rows_per_group,
    HAS_W: tl.constexpr,
    HAS_DRES: tl.constexpr,
    BLOCK: tl.constexpr,
    CBLOCK: tl.constexpr,
):
    # Program (chunk, row group): dx for its chunk of each row of the group, and
    # the group's share of dW for the chunk (summed over groups on the host).
    ch = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    k = tl.arange(0, CBLOCK)
    if HAS_W:
        w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = g * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, M)
    for row in range(row_start, row_end):
        rstd = tl.load(RSTD + row)
        dot = tl.sum(tl.load(PART + row * C + k, mask=k < C, other=0.0), axis=0)
        coef = dot * rstd / N
        dy = tl.load(DY + row * dy_stride + c, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * x_stride + c, mask=mask, other=0.0).to(tl.float32)
        xhat = x * rstd
        wdy = dy
        if HAS_W:
            wdy = dy * w
            dw_acc += dy * xhat
        dx = (wdy - xhat * coef) * rstd
        if HAS_DRES:
            dx += tl.load(DRES + row * dres_stride + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * dx_stride + c, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW_PARTIAL + g * N + c, dw_acc, mask=mask)


def rms_norm_forward(
    x: Tensor, weight: Tensor | None, residual: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel: returns ``(y, rstd, s)`` (``s`` empty without residual)."""
    n = x.shape[-1]
    x2 = as_rows(x, n)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = as_rows(residual, n)
        s = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        r2 = s = x2
    chunks, width = row_split(m, n, x.device)
    if chunks > 1:
        part = torch.empty((m, chunks), dtype=torch.float32, device=x.device)
        launch_split(
            _rms_split_sumsq_kernel, (m, chunks),
            (x2, r2, s, part, x2.stride(0), r2.stride(0), s.stride(0), n, chunks),
            width, HAS_RES=residual is not None,
        )  # fmt: skip
        src = s if residual is not None else x2
        launch_split(
            _rms_split_fwd_apply_kernel, (m, chunks),
            (src, weight if weight is not None else x2, y, rstd, part, src.stride(0),
             y.stride(0), n, chunks, eps),
            width, chunks, HAS_W=weight is not None,
        )  # fmt: skip
    elif m > 0 and n > 0:
        block, one = row_block(n, wide=True)

        launch_row_tiles(
            "rms_norm_fwd",
            _rms_norm_fwd_kernel,
            (x2, r2, s, weight if weight is not None else x2, y, rstd,
             x2.stride(0), r2.stride(0), s.stride(0), y.stride(0), m, n, eps),
            m,
            block,
            one,
            (x.dtype, residual is not None, weight is not None),
            x.device,
            HAS_RES=residual is not None,
            HAS_W=weight is not None,
        )  # fmt: skip
    lead = x.shape[:-1]
    s_out = s.view(x.shape) if residual is not None else x.new_empty(0)
    return y.view(x.shape), rstd.view(lead), s_out


def rms_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, dres: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Launch the backward kernel: returns ``(dx, dweight)`` (``dweight`` empty without weight).

    ``x`` is the normalised input (the sum ``s`` for ``add_rms_norm``); ``dres`` is
    the gradient flowing into that sum from elsewhere, added to ``dx``.
    """
    n = x.shape[-1]
    x2, dy2 = as_rows(x, n), as_rows(dy, n)
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dres2 = as_rows(dres, n) if dres is not None else dx
    has_w = weight is not None
    chunks, width = row_split(m, n, x.device)
    if chunks > 1:
        w_arg = weight if has_w else x2
        part = torch.empty((m, chunks), dtype=torch.float32, device=x.device)
        launch_split(
            _rms_split_bwd_dot_kernel, (m, chunks),
            (dy2, x2, w_arg, part, dy2.stride(0), x2.stride(0), n, chunks),
            width, HAS_W=has_w,
        )  # fmt: skip
        groups, rows_per_group = split_groups(m, chunks, x.device)
        partial = torch.empty((groups if has_w else 1, n), dtype=torch.float32, device=x.device)
        launch_split(
            _rms_split_bwd_apply_kernel, (chunks, groups),
            (dy2, x2, w_arg, rstd.reshape(-1), dres2, dx, part, partial, dy2.stride(0),
             x2.stride(0), dres2.stride(0), dx.stride(0), m, n, chunks, rows_per_group),
            width, chunks, HAS_W=has_w, HAS_DRES=dres is not None,
        )  # fmt: skip
        dw = partial.sum(0).to(weight.dtype) if has_w else x.new_empty(0)
        return dx.view(x.shape), dw
    block, one = row_block(n)
    if m == 0 or n == 0:
        partial = torch.zeros((1, n), dtype=torch.float32, device=x.device)
    else:
        # A row in one block: the launch is repeatable (every program stores its
        # dW row), so the tile shape, warps and grid are tuned per shape class.
        # Longer rows accumulate into DW_PARTIAL and keep the default.
        partial = torch.zeros(
            (persistent_programs(m, x.device, n) if has_w else 1, n),
            dtype=torch.float32,
            device=x.device,
        )
        programs = launch_persistent_rows(
            "rms_norm_bwd",
            _rms_norm_bwd_kernel,
            lambda grid: (
                dy2, x2, weight if has_w else x2, rstd.reshape(-1), dres2, dx, partial,
                dy2.stride(0), x2.stride(0), dres2.stride(0), dx.stride(0), m, n, cdiv(m, grid),
            ),
            m,
            n,
            block,
            one,
            (x.dtype, has_w, dres is not None),
            x.device,
            HAS_W=has_w,
            HAS_DRES=dres is not None,
            TWO_BLOCK=not one and n <= 2 * block,
        )  # fmt: skip
        partial = partial[:programs] if has_w else partial
    dw = partial.sum(0).to(weight.dtype) if has_w else x.new_empty(0)
    return dx.view(x.shape), dw


# -- torch implementations with the same semantics (CPU fallback, torch backend) --


def _rms_norm_forward_torch(
    x: Tensor, weight: Tensor | None, residual: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    acc = opmath(x)
    s_out = x.new_empty(0)
    if residual is not None:
        s_out = (x.to(acc) + residual.to(acc)).to(x.dtype)
        x = s_out
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    y = xf * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(x.dtype).contiguous(), rstd.to(torch.float32), s_out.contiguous()


def _rms_norm_backward_torch(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, dres: Tensor | None
) -> tuple[Tensor, Tensor]:
    acc = opmath(x)
    xf, dyf, r = x.to(acc), dy.to(acc), rstd.to(acc).unsqueeze(-1)
    xhat = xf * r
    wdy = dyf * weight.to(acc) if weight is not None else dyf
    dx = (wdy - xhat * (wdy * xhat).mean(-1, keepdim=True)) * r
    if dres is not None:
        dx = dx + dres.to(acc)
    if weight is not None:
        dw = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    else:
        dw = x.new_empty(0)
    return dx.to(x.dtype).contiguous(), dw


def _rms_norm_ref(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """Plain torch RMSNorm in ``x``'s own dtype, differentiable: the test reference."""
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


def _add_rms_norm_ref(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Plain torch add + RMSNorm: ``s`` in the inputs' dtype, as the fused op stores it."""
    s = x + residual
    return _rms_norm_ref(s, weight, eps), s


# -- custom ops: opaque to torch.compile, with fake implementations and autograd --


def _rms_fwd_fake(x, weight, residual, eps):
    like = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = torch.empty_like(like) if residual is not None else x.new_empty(0)
    return like, x.new_empty(x.shape[:-1], dtype=torch.float32), s


@kernel_op("rms_norm_fwd", _rms_fwd_fake, rms_norm_forward, _rms_norm_forward_torch)
def _rms_fwd(
    x: Tensor, weight: Tensor | None, residual: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]: ...


def _rms_bwd_fake(dy, x, weight, rstd, dres):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw


@kernel_op("rms_norm_bwd", _rms_bwd_fake, rms_norm_backward, _rms_norm_backward_torch, key=1)
def _rms_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, dres: Tensor | None
) -> tuple[Tensor, Tensor]: ...


def _rms_setup_context(ctx, inputs, output):
    x, weight, residual, _eps = inputs
    _y, rstd, s = output
    ctx.has_res = residual is not None
    ctx.save_for_backward(s if ctx.has_res else x, weight, rstd)


def _rms_backward(ctx, dy, _drstd, ds):
    xs, weight, rstd = ctx.saved_tensors
    dres = ds if ctx.has_res and ds is not None else None
    if dy is None:  # only the sum of add_rms_norm was used
        dy = torch.zeros_like(xs)
    dx, dw = _rms_bwd.pick(ctx)(dy, xs, weight, rstd, dres)
    return dx, (dw if weight is not None else None), (dx if ctx.has_res else None), None


_rms_apply = differentiable(
    "_RMSNormFunction", _rms_fwd, _rms_setup_context, _rms_backward, non_differentiable=(1,)
)


def _check(x: Tensor, weight: Tensor | None, eps: float, residual: Tensor | None) -> None:
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    check_row_param("weight", weight, x)
    if residual is not None:
        check_float("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                f"got {tuple(residual.shape)} {residual.dtype}"
            )
    check_same_device(x=x, weight=weight, residual=residual)
    check_eps(eps)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x**2) + eps) * weight``.

    Any leading shape; fp32/fp16/bf16 in, the same dtype out, fp32 accumulation.
    ``weight`` (shape ``(x.shape[-1],)``) may be None.
    """
    _check(x, weight, eps, None)
    return _rms_apply(x, weight, None, float(eps))[0]


def add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor | None = None, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Fused ``s = x + residual; return rms_norm(s, weight, eps), s`` in one pass."""
    _check(x, weight, eps, residual)
    y, _rstd, s = _rms_apply(x, weight, residual, float(eps))
    return y, s
