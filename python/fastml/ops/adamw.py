"""AdamW with a multi-tensor fused step: one Triton launch per dtype group.

A drop-in for ``torch.optim.AdamW`` (it subclasses it: same param groups,
state keys, ``state_dict`` and hooks). On the Triton path every parameter of a
group with the same (param, grad, state) dtypes is updated by a single kernel
launch: the kernel reads a table of raw pointers, element counts and
per-tensor bias corrections, and each program updates one block of one
tensor, reading the parameter, gradient and moments once and writing them once
(fp32 math, stored in the tensors' dtypes). On the torch backend (CPU tensors
by default) it is exactly ``torch.optim.AdamW.step``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from fastml.ops._dispatch import tl, triton, use_triton

_BLOCK = 1024  # elements per iteration: 4 warps x 32 threads x 8 (two 16-byte fp32 accesses)
_CHUNK = 16 * _BLOCK  # elements per program: the tensor search is paid once per 16 blocks
_TL_DTYPES = {}


def _tl_dtype(dtype: torch.dtype):
    if not _TL_DTYPES:
        _TL_DTYPES.update(
            {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
        )
    return _TL_DTYPES[dtype]


@triton.jit
def _table_ptr(TABLE, t, column, n_tensors, TY: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(TABLE + column * n_tensors + t).to(tl.pointer_type(TY))
    if ALIGNED:  # every tensor of the launch starts on 16 bytes: vector accesses
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _adamw_block(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    offs,
    end,
    stream_offs,
    seed,
    decay,
    step_size,
    bc2_sqrt,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    P_TY: tl.constexpr,
    S_TY: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    SR: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Update one block of one tensor (fp32 math, stored in the tensors' dtypes)."""
    if MASKED:
        mask = offs < end
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
        m = tl.load(m_ptr + offs).to(tl.float32)
        v = tl.load(v_ptr + offs).to(tl.float32)
    if MAXIMIZE:
        g = -g
    p = p * decay
    m = m + (g - m) * one_minus_beta1
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        if MASKED:
            vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            vmax = tl.load(vmax_ptr + offs).to(tl.float32)
        vmax = tl.maximum(vmax, v)
        denom = tl.sqrt(vmax) / bc2_sqrt + eps
    else:
        denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * m / denom
    if SR:
        # Stochastic rounding to bfloat16: add 16 random bits below the kept
        # mantissa and truncate, so a value rounds up with probability equal to
        # its distance from the lower neighbour (unbiased). The result is exact
        # in bfloat16, so the store's own rounding does not change it.
        bits = p.to(tl.int32, bitcast=True)
        noise = (tl.randint(seed, stream_offs) & 0xFFFF).to(tl.int32)
        rounded = ((bits + noise) & -65536).to(tl.float32, bitcast=True)
        p = tl.where(p != p, p, rounded)
    if MASKED:
        tl.store(p_ptr + offs, p.to(P_TY), mask=mask)
        tl.store(m_ptr + offs, m.to(S_TY), mask=mask)
        tl.store(v_ptr + offs, v.to(S_TY), mask=mask)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, vmax.to(S_TY), mask=mask)
    else:
        tl.store(p_ptr + offs, p.to(P_TY))
        tl.store(m_ptr + offs, m.to(S_TY))
        tl.store(v_ptr + offs, v.to(S_TY))
        if AMSGRAD:
            tl.store(vmax_ptr + offs, vmax.to(S_TY))


@triton.jit
def _adamw_kernel(
    TABLE,
    NUMELS,
    FIRST_CHUNK,
    STEPS,
    LR,
    BETA1,
    BETA2,
    n_tensors,
    step_all,
    bc1_all,
    bc2_sqrt_all,
    step_size_all,
    decay_all,
    one_minus_beta1_all,
    one_minus_beta2_all,
    weight_decay,
    eps,
    seed,
    P_TY: tl.constexpr,
    G_TY: tl.constexpr,
    S_TY: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    STEP_MODE: tl.constexpr,
    BC_IN_KERNEL: tl.constexpr,
    LR_PTR: tl.constexpr,
    BETAS_PTR: tl.constexpr,
    HOST_STEP_SIZE: tl.constexpr,
    SR: tl.constexpr,
    ALIGNED: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # The tensor of this chunk: the last t with FIRST_CHUNK[t] <= pid (ascending,
    # FIRST_CHUNK[0] == 0), by a binary search over the small cached table.
    lo = pid * 0
    hi = lo + n_tensors
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go_right = tl.load(FIRST_CHUNK + mid, mask=hi - lo > 1, other=pid + 1) <= pid
        lo = tl.where(go_right & (hi - lo > 1), mid, lo)
        hi = tl.where(go_right | (hi - lo <= 1), hi, mid)
    t = lo
    first = tl.load(FIRST_CHUNK + t)
    start = (pid - first) * CHUNK
    end = tl.minimum(start + CHUNK, tl.load(NUMELS + t))
    p_ptr = _table_ptr(TABLE, t, 0, n_tensors, P_TY, ALIGNED)
    g_ptr = _table_ptr(TABLE, t, 1, n_tensors, G_TY, ALIGNED)
    m_ptr = _table_ptr(TABLE, t, 2, n_tensors, S_TY, ALIGNED)
    v_ptr = _table_ptr(TABLE, t, 3, n_tensors, S_TY, ALIGNED)
    if AMSGRAD:
        vmax_ptr = _table_ptr(TABLE, t, 4, n_tensors, S_TY, ALIGNED)
    else:
        vmax_ptr = m_ptr  # unused
    # Scalars: the learning rate and betas are kernel arguments or read from
    # device tensors (a schedule that changes them needs no host sync and no
    # new compilation); the step is uniform, per tensor, or a device counter.
    # Host-given values are computed in float64 and rounded once (1 - beta2 from
    # a float32 beta2 would be off by ~1e-5 relative).
    if LR_PTR:
        lr = tl.load(LR).to(tl.float32)
        decay = 1.0 - lr * weight_decay
    else:
        lr = LR
        decay = decay_all
    if BETAS_PTR:
        beta1 = tl.load(BETA1).to(tl.float32)
        beta2 = tl.load(BETA2).to(tl.float32)
        one_minus_beta1 = 1.0 - beta1
        one_minus_beta2 = 1.0 - beta2
    else:
        beta1 = BETA1
        beta2 = BETA2
        one_minus_beta1 = one_minus_beta1_all
        one_minus_beta2 = one_minus_beta2_all
    if STEP_MODE == 0:
        step = step_all
        bc1 = bc1_all
        bc2_sqrt = bc2_sqrt_all
    elif STEP_MODE == 1:
        bc1 = tl.load(STEPS + t)
        bc2_sqrt = tl.load(STEPS + n_tensors + t)
        step = tl.load(STEPS + 2 * n_tensors + t)
    else:
        step_col = 5 if AMSGRAD else 4
        step = tl.load(_table_ptr(TABLE, t, step_col, n_tensors, tl.float32, False))
        bc1 = bc1_all
        bc2_sqrt = bc2_sqrt_all
    if BC_IN_KERNEL:
        # 1 - beta^step in float64 (beta as given in float32), then rounded.
        s64 = step.to(tl.float64)
        pow1 = tl.exp2(s64 * tl.log2(beta1.to(tl.float64)))
        pow2 = tl.exp2(s64 * tl.log2(beta2.to(tl.float64)))
        bc1 = (1.0 - pow1).to(tl.float32)
        bc2_sqrt = tl.sqrt((1.0 - pow2).to(tl.float32))
    if HOST_STEP_SIZE:
        step_size = step_size_all
    else:
        step_size = lr / bc1
    if SR:
        # The random stream: keyed by (seed, step), counted by the element's
        # position in the launch's concatenation of tensors.
        seed64 = seed.to(tl.int64) + step.to(tl.int64) * 4294967296
    else:
        seed64 = seed
    stream_base = first * CHUNK
    full_end = start + ((end - start) // BLOCK) * BLOCK
    for base in tl.range(start, full_end, BLOCK):
        offs = tl.multiple_of(base, BLOCK) + tl.arange(0, BLOCK)
        _adamw_block(
            p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, end, stream_base + offs, seed64,
            decay, step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
            P_TY, S_TY, AMSGRAD, MAXIMIZE, SR, False,
        )  # fmt: skip
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _adamw_block(
            p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, end, stream_base + offs, seed64,
            decay, step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
            P_TY, S_TY, AMSGRAD, MAXIMIZE, SR, True,
        )  # fmt: skip


# Device copies of the pointer tables, keyed by device and the table's
# contents: a training loop steps the same tensors (and, with the caching
# allocator, usually the same gradient addresses) every step, so the table
# is built and copied once, not per step. A few entries per device.
_TABLES: dict[tuple, Tensor] = {}
_TABLES_MAX = 16


def _device_table(device: torch.device, values: list[int]) -> Tensor:
    key = (device, tuple(values))
    table = _TABLES.get(key)
    if table is None:
        host = torch.tensor(values, dtype=torch.int64)
        table = host if device.type == "cpu" else host.to(device)
        if len(_TABLES) >= _TABLES_MAX:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = table
    return table


def _sr_round_bf16(x: Tensor, generator: torch.Generator) -> Tensor:
    """Stochastic rounding of a float32 tensor to bfloat16 (the torch reference)."""
    noise = torch.randint(
        0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32
    )
    rounded = ((x.view(torch.int32) + noise) & -65536).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


def _scalar_arg(value: float | Tensor, device: torch.device) -> tuple[Any, bool]:
    """A kernel scalar: a float, or a tensor the kernel reads at launch (no host sync).

    A tensor on the parameters' device is read by the kernel; a CPU tensor
    next to CUDA parameters is read on the host (no sync); one on another
    device is copied over (no sync)."""
    if isinstance(value, Tensor):
        if value.device == device:
            return value, True
        if value.device.type == "cpu":
            return float(value), False
        return value.to(device), True
    return float(value), False


def adamw_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[float] | list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> None:
    """One fused AdamW update of contiguous tensors that share device and dtypes.

    One launch over a work list of chunks: program ``i`` updates chunk ``i``
    (16,384 elements) of the concatenation of the tensors, finding its tensor
    by a binary search of each tensor's first chunk, and walks it in blocks of
    1,024 with 16-byte accesses (when every tensor starts on 16 bytes). The
    host builds one small table (pointers, sizes, first chunks), cached on the
    device while the tensors stay the same.

    ``steps`` are the parameters' step counts after this step: floats (the
    bias corrections are then computed on the host, as kernel arguments when
    all are equal) or the device step tensors of a ``capturable`` optimiser
    (read by the kernel, which computes the corrections: no host sync, so the
    step can be captured in a CUDA graph). ``lr``, ``beta1`` and ``beta2`` may
    be device tensors, read by the kernel at each launch. With
    ``stochastic_rounding``, bfloat16 parameters are rounded stochastically from
    the float32 update, from a random stream keyed by ``(seed, step)``.
    """
    n = len(params)
    if n == 0:
        return
    device = params[0].device
    device_steps = isinstance(steps[0], Tensor)
    if device_steps and any(t.device != device for t in steps):  # type: ignore[union-attr]
        raise ValueError("step tensors must be on the parameters' device")
    columns = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    ptrs = [t.data_ptr() for col in columns for t in col]
    aligned = all(ptr % 16 == 0 for ptr in ptrs)
    if device_steps:
        ptrs += [t.data_ptr() for t in steps]  # type: ignore[union-attr]
    numels = [p.numel() for p in params]
    first_chunk = []
    total = 0
    for k in numels:
        first_chunk.append(total)
        total += (k + _CHUNK - 1) // _CHUNK
    if total == 0:
        return
    table = _device_table(device, ptrs + numels + first_chunk)
    np_ = len(ptrs)
    lr_arg, lr_ptr = _scalar_arg(lr, device)
    b1_arg, b1_ptr = _scalar_arg(beta1, device)
    b2_arg, b2_ptr = _scalar_arg(beta2, device)
    betas_ptr = b1_ptr or b2_ptr
    if betas_ptr:  # both as device tensors (a fill, no host sync)
        if not b1_ptr:
            b1_arg = torch.full((), b1_arg, dtype=torch.float32, device=device)
        if not b2_ptr:
            b2_arg = torch.full((), b2_arg, dtype=torch.float32, device=device)
    bc_in_kernel = device_steps or betas_ptr
    step_all = bc1_all = bc2_sqrt_all = 1.0
    floats = table  # unused unless per-tensor steps
    if device_steps:
        mode = 2
    else:
        host_steps = [float(s) for s in steps]  # type: ignore[arg-type]
        uniform = all(s == host_steps[0] for s in host_steps)
        mode = 0 if uniform else 1
        if bc_in_kernel:
            bc1 = bc2_sqrt = [1.0] * len(host_steps)  # computed in the kernel
        else:
            b1, b2 = float(b1_arg), float(b2_arg)
            bc1 = [1.0 - b1**s for s in host_steps]
            bc2_sqrt = [math.sqrt(1.0 - b2**s) for s in host_steps]
        if uniform:
            step_all, bc1_all, bc2_sqrt_all = host_steps[0], bc1[0], bc2_sqrt[0]
        else:
            floats = torch.tensor(bc1 + bc2_sqrt + host_steps, dtype=torch.float32)
            if device.type != "cpu":
                floats = floats.to(device, non_blocking=True)
    sr = bool(stochastic_rounding) and params[0].dtype == torch.bfloat16
    host_step_size = mode == 0 and not lr_ptr and not bc_in_kernel
    step_size_all = lr_arg / bc1_all if host_step_size else 1.0
    decay_all = 1.0 - lr_arg * weight_decay if not lr_ptr else 1.0
    omb1 = 1.0 - b1_arg if not betas_ptr else 1.0
    omb2 = 1.0 - b2_arg if not betas_ptr else 1.0
    _adamw_kernel[(total,)](
        table,
        table[np_:],
        table[np_ + n :],
        floats,
        lr_arg,
        b1_arg,
        b2_arg,
        n,
        step_all,
        bc1_all,
        bc2_sqrt_all,
        step_size_all,
        decay_all,
        omb1,
        omb2,
        float(weight_decay),
        float(eps),
        int(seed),
        P_TY=_tl_dtype(params[0].dtype),
        G_TY=_tl_dtype(grads[0].dtype),
        S_TY=_tl_dtype(exp_avgs[0].dtype),
        AMSGRAD=amsgrad,
        MAXIMIZE=maximize,
        STEP_MODE=mode,
        BC_IN_KERNEL=bc_in_kernel,
        LR_PTR=lr_ptr,
        BETAS_PTR=betas_ptr,
        HOST_STEP_SIZE=host_step_size,
        SR=sr,
        ALIGNED=aligned,
        SEARCH_STEPS=max(1, (n - 1).bit_length()),
        BLOCK=_BLOCK,
        CHUNK=_CHUNK,
    )


_SEED_LIMIT = 1 << 31
_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class AdamW(torch.optim.AdamW):
    """Drop-in for ``torch.optim.AdamW`` with a multi-tensor fused Triton step.

    Same arguments, defaults, param groups and ``state_dict`` as
    ``torch.optim.AdamW``. CUDA parameters (or any, with
    ``set_backend("triton")``) take the fused step: one launch per
    (device, dtype) group; others run ``torch.optim.AdamW.step``.

    ``lr`` and ``betas`` may be tensors: on the parameters' device the kernel
    reads them at each step, so a schedule that writes them in place
    (``torch.optim.lr_scheduler`` does) costs no host sync. ``capturable=True``
    keeps the step counters on the device and computes the bias corrections in
    the kernel, so a step can be captured in a CUDA graph (warm up with one
    eager step first, as torch asks, so the launch's tables exist before
    capture).

    ``stochastic_rounding=True`` rounds bfloat16 parameters stochastically
    from the float32 update (unbiased: a small update survives on average
    instead of being rounded away), from a random stream keyed by ``seed``
    (drawn from torch's default generator when ``None``) and the step;
    parameters of other dtypes are unaffected. The stream differs between the
    Triton kernel and the torch reference path (CPU tensors), both seeded.
    ``state_dtype=torch.float32`` keeps the moments in float32 for half-precision
    parameters (torch keeps them in the parameter's dtype, the default here: a
    bf16 second moment holds 8 bits of mantissa, an fp16 one underflows for
    gradients below ~1e-4); it is kept through ``load_state_dict``.
    ``differentiable`` and ``fused=True`` (torch's own fused kernel) are not
    supported.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        stochastic_rounding: bool = False,
        seed: int | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        if differentiable:
            raise ValueError("differentiable=True is not supported by fastml.ops.AdamW, got True")
        if fused:
            raise ValueError(
                "fused=True selects torch's own fused kernel; fastml.ops.AdamW is already "
                "fused: leave fused unset"
            )
        if not isinstance(stochastic_rounding, bool):
            raise TypeError(
                f"stochastic_rounding must be a bool, got {type(stochastic_rounding).__name__}"
            )
        if seed is None:
            seed = int(torch.randint(0, _SEED_LIMIT, ()).item()) if stochastic_rounding else 0
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
        if state_dtype is not None and state_dtype not in _STATE_DTYPES:
            raise ValueError(
                f"state_dtype must be None (the parameter's dtype) or one of "
                f"{[str(d) for d in _STATE_DTYPES]}, got {state_dtype!r}"
            )
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
        )
        self.defaults["stochastic_rounding"] = stochastic_rounding
        self.defaults["seed"] = seed
        self.defaults["state_dtype"] = state_dtype
        for group in self.param_groups:
            group.setdefault("stochastic_rounding", stochastic_rounding)
            group.setdefault("seed", seed)
            group.setdefault("state_dtype", state_dtype)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("stochastic_rounding", False)
            group.setdefault("seed", 0)
            group.setdefault("state_dtype", None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.AdamW.load_state_dict``, keeping each group's ``state_dtype``.

        torch casts every floating-point state tensor to its parameter's dtype
        on load; moments of groups with a ``state_dtype`` are restored from the
        saved values in that dtype instead (no round trip through the
        parameter's dtype).
        """
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for saved_id, (p, group) in zip(saved_ids, params, strict=False):
            dtype = group.get("state_dtype")
            src, dst = saved_state.get(saved_id), self.state.get(p)
            if dtype is None or not src or not dst:
                continue
            for key in _MOMENTS:
                if key in src and key in dst:
                    dst[key] = src[key].to(device=p.device, dtype=dtype, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step (``closure`` re-evaluates the loss, as in torch)."""
        first = next(
            (p for g in self.param_groups for p in g["params"] if p.grad is not None), None
        )
        fused = first is not None and use_triton(first)
        # Stochastic rounding and a state dtype of its own are fastml's: the torch
        # backend then runs the reference update here rather than torch's step.
        own = any(g.get("stochastic_rounding") or g.get("state_dtype") for g in self.param_groups)
        if not fused and not own:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._group_step(group, fused)
        return loss

    def _group_step(self, group: dict[str, Any], fused: bool) -> None:
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        amsgrad = bool(group["amsgrad"])
        capturable = bool(group["capturable"])
        rounding = bool(group.get("stochastic_rounding", False))
        seed = int(group.get("seed", 0))
        live = []
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            if torch.is_complex(p):
                raise TypeError("fastml.ops.AdamW supports real parameters only, got a complex one")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = (
                    torch.zeros((), dtype=torch.float32, device=p.device)
                    if capturable
                    else torch.tensor(0.0, dtype=torch.float32)
                )
                # Moments in the group's state_dtype (None: the parameter's, as torch).
                sd = group.get("state_dtype") or p.dtype
                fmt = torch.preserve_format
                state["exp_avg"] = torch.zeros_like(p, dtype=sd, memory_format=fmt)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=sd, memory_format=fmt)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=sd, memory_format=fmt)
            live.append((p, grad, state))
        if not live:
            return
        # Every step counter at once (one call, as torch's foreach AdamW does).
        if capturable:  # the counters live with their parameters; the kernel reads them
            for p, _, state in live:
                if state["step"].device != p.device:  # e.g. a state saved without capturable
                    state["step"] = state["step"].to(p.device, torch.float32)
        step_tensors = [state["step"] for _, _, state in live]
        torch._foreach_add_(step_tensors, 1)
        if capturable:  # the host never reads them: no sync, graph-capturable
            steps: list[Any] = step_tensors
        elif len(step_tensors) > 1:
            steps = torch.stack(step_tensors).tolist()
        else:
            steps = [float(step_tensors[0])]
        buckets: dict[tuple, list] = {}
        for (p, grad, state), step in zip(live, steps, strict=True):
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            vmax = state.get("max_exp_avg_sq") if amsgrad else None
            if (
                not fused
                or p.dtype == torch.float64
                or not p.is_contiguous()
                or not exp_avg.is_contiguous()
                or not exp_avg_sq.is_contiguous()
                or (vmax is not None and not vmax.is_contiguous())
            ):
                self._single_step(p, grad, state, group, rounding, seed)
                continue
            grad = grad.contiguous()
            key = (p.device, p.dtype, grad.dtype, exp_avg.dtype)
            buckets.setdefault(key, []).append((p, grad, exp_avg, exp_avg_sq, vmax, step))
        for items in buckets.values():
            cols = list(zip(*items, strict=True))
            adamw_step_(
                list(cols[0]),
                list(cols[1]),
                list(cols[2]),
                list(cols[3]),
                list(cols[4]) if amsgrad else [],
                list(cols[5]),
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                amsgrad=amsgrad,
                maximize=bool(group["maximize"]),
                stochastic_rounding=rounding,
                seed=seed,
            )

    @staticmethod
    def _single_step(p, grad, state, group, rounding: bool, seed: int) -> None:
        """The reference update of one tensor, for layouts the fused kernel does not
        take and for stochastic rounding or a ``state_dtype`` on the torch backend:
        half-precision tensors are updated in float32 and stored once, as the
        kernel does; the learning rate, betas and step stay tensors when they are
        (no host sync)."""
        lr, beta1, beta2, step = (
            float(x) if not isinstance(x, Tensor) or x.device.type == "cpu" else x.double()
            for x in (group["lr"], *group["betas"], state["step"])
        )
        work = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        pw, m, v = p.to(work), exp_avg.to(work), exp_avg_sq.to(work)
        g = grad.to(work)
        if group["maximize"]:
            g = -g
        pw = pw * (1.0 - lr * group["weight_decay"])
        m = m.lerp(g, 1.0 - beta1)
        v = v * beta2 + (1.0 - beta2) * g * g
        vmax = v
        if group["amsgrad"]:
            vmax = torch.maximum(state["max_exp_avg_sq"].to(work), v)
            state["max_exp_avg_sq"].copy_(vmax)
        bc1 = 1.0 - beta1**step
        bc2_sqrt = (1.0 - beta2**step) ** 0.5
        pw = pw - (lr / bc1) * m / (vmax.sqrt() / bc2_sqrt + group["eps"])
        if rounding and p.dtype == torch.bfloat16:
            gen = torch.Generator(device=p.device)
            gen.manual_seed(seed * 1_000_003 + int(step) * 7_919 + p.numel())
            p.copy_(_sr_round_bf16(pw.float(), gen))
        else:
            p.copy_(pw)
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
