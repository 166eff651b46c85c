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

_BLOCK = 1024
_TL_DTYPES = {}


def _tl_dtype(dtype: torch.dtype):
    if not _TL_DTYPES:
        _TL_DTYPES.update(
            {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
        )
    return _TL_DTYPES[dtype]


@triton.jit
def _adamw_kernel(
    PTRS,
    NUMELS,
    FIRST_BLOCK,
    STEP_SIZE,
    BC2_SQRT,
    n_tensors,
    step_size_all,
    bc2_sqrt_all,
    decay,
    beta1,
    beta2,
    eps,
    P_TY: tl.constexpr,
    G_TY: tl.constexpr,
    S_TY: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    PER_TENSOR_STEP: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # The tensor of this block: the last t with FIRST_BLOCK[t] <= pid (FIRST_BLOCK
    # ascending, FIRST_BLOCK[0] == 0), by a binary search over the small table
    # (it stays in cache), instead of a per-block table built on the host.
    lo = pid * 0
    hi = lo + n_tensors
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go_right = tl.load(FIRST_BLOCK + mid, mask=hi - lo > 1, other=pid + 1) <= pid
        lo = tl.where(go_right & (hi - lo > 1), mid, lo)
        hi = tl.where(go_right | (hi - lo <= 1), hi, mid)
    t = lo
    start = (pid - tl.load(FIRST_BLOCK + t)) * BLOCK
    n = tl.load(NUMELS + t)
    p_ptr = tl.load(PTRS + t).to(tl.pointer_type(P_TY))
    g_ptr = tl.load(PTRS + n_tensors + t).to(tl.pointer_type(G_TY))
    m_ptr = tl.load(PTRS + 2 * n_tensors + t).to(tl.pointer_type(S_TY))
    v_ptr = tl.load(PTRS + 3 * n_tensors + t).to(tl.pointer_type(S_TY))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    p = p * decay
    m = m + (g - m) * (1.0 - beta1)
    v = v * beta2 + (1.0 - beta2) * g * g
    if PER_TENSOR_STEP:
        step_size = tl.load(STEP_SIZE + t)
        bc2_sqrt = tl.load(BC2_SQRT + t)
    else:
        step_size = step_size_all
        bc2_sqrt = bc2_sqrt_all
    if AMSGRAD:
        vmax_ptr = tl.load(PTRS + 4 * n_tensors + t).to(tl.pointer_type(S_TY))
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32), v)
        tl.store(vmax_ptr + offs, vmax.to(S_TY), mask=mask)
        denom = tl.sqrt(vmax) / bc2_sqrt + eps
    else:
        denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * m / denom
    tl.store(p_ptr + offs, p.to(P_TY), mask=mask)
    tl.store(m_ptr + offs, m.to(S_TY), mask=mask)
    tl.store(v_ptr + offs, v.to(S_TY), mask=mask)


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


def adamw_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """One fused AdamW update of tensors that share device and dtypes (contiguous).

    One launch: program ``i`` updates block ``i`` of the concatenation of the
    tensors and finds its tensor by a binary search of each tensor's first
    block. The host builds one small table (pointers, sizes, first blocks:
    ``5n + 1`` integers), cached on the device while the tensors stay the same;
    the bias corrections are kernel arguments when every tensor is at the same
    step (the usual case), else one small per-tensor table.
    """
    n = len(params)
    if n == 0:
        return
    device = params[0].device
    columns = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    ptrs = [t.data_ptr() for col in columns for t in col]
    numels = [p.numel() for p in params]
    first_block = []
    total = 0
    for k in numels:
        first_block.append(total)
        total += (k + _BLOCK - 1) // _BLOCK
    if total == 0:
        return
    table = _device_table(device, ptrs + numels + first_block)
    np_ = len(ptrs)
    uniform = all(s == steps[0] for s in steps)
    step_sizes = [lr / (1.0 - beta1**s) for s in (steps[:1] if uniform else steps)]
    bc2_sqrts = [math.sqrt(1.0 - beta2**s) for s in (steps[:1] if uniform else steps)]
    if uniform:
        floats = table  # unused by the kernel (PER_TENSOR_STEP=False)
    else:
        floats = torch.tensor(step_sizes + bc2_sqrts, dtype=torch.float32)
        if device.type != "cpu":
            floats = floats.to(device, non_blocking=True)
    _adamw_kernel[(total,)](
        table,
        table[np_:],
        table[np_ + n :],
        floats,
        floats[n:] if not uniform else floats,
        n,
        step_sizes[0],
        bc2_sqrts[0],
        1.0 - lr * weight_decay,
        beta1,
        beta2,
        eps,
        P_TY=_tl_dtype(params[0].dtype),
        G_TY=_tl_dtype(grads[0].dtype),
        S_TY=_tl_dtype(exp_avgs[0].dtype),
        AMSGRAD=amsgrad,
        MAXIMIZE=maximize,
        PER_TENSOR_STEP=not uniform,
        SEARCH_STEPS=max(1, (n - 1).bit_length()),
        BLOCK=_BLOCK,
    )


class AdamW(torch.optim.AdamW):
    """Drop-in for ``torch.optim.AdamW`` with a multi-tensor fused Triton step.

    Same arguments, defaults, param groups and ``state_dict`` as
    ``torch.optim.AdamW``. CUDA parameters (or any, with
    ``set_backend("triton")``) take the fused step; others run
    ``torch.optim.AdamW.step``. ``capturable``, ``differentiable`` and
    ``fused=True`` (torch's own fused kernel) are not supported.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        for name, flag in (("capturable", capturable), ("differentiable", differentiable)):
            if flag:
                raise ValueError(f"{name}=True is not supported by fastml.ops.AdamW, got True")
        if fused:
            raise ValueError(
                "fused=True selects torch's own fused kernel; fastml.ops.AdamW is already "
                "fused: leave fused unset"
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
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step (``closure`` re-evaluates the loss, as in torch)."""
        first = next(
            (p for g in self.param_groups for p in g["params"] if p.grad is not None), None
        )
        if first is None or not use_triton(first):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._fused_group_step(group)
        return loss

    def _fused_group_step(self, group: dict[str, Any]) -> None:
        lr = group["lr"]
        lr = float(lr.item()) if isinstance(lr, Tensor) else float(lr)
        beta1, beta2 = (float(b) for b in group["betas"])
        amsgrad = bool(group["amsgrad"])
        buckets: dict[tuple, list] = {}
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
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            live.append((p, grad, state))
        if not live:
            return
        # Every step counter at once (one call, as torch's foreach AdamW does).
        step_tensors = [state["step"] for _, _, state in live]
        torch._foreach_add_(step_tensors, 1)
        steps = (
            torch.stack(step_tensors).tolist()
            if len(step_tensors) > 1
            else [float(step_tensors[0])]
        )
        for (p, grad, state), step in zip(live, steps, strict=True):
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            vmax = state.get("max_exp_avg_sq") if amsgrad else None
            if (
                p.dtype == torch.float64
                or not p.is_contiguous()
                or not exp_avg.is_contiguous()
                or not exp_avg_sq.is_contiguous()
                or (vmax is not None and not vmax.is_contiguous())
            ):
                self._single_step(p, grad, state, group, lr, beta1, beta2)
                continue
            grad = grad.contiguous()
            key = (p.device, p.dtype, grad.dtype, exp_avg.dtype)
            buckets.setdefault(key, []).append((p, grad, exp_avg, exp_avg_sq, vmax, float(step)))
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
            )

    @staticmethod
    def _single_step(p, grad, state, group, lr, beta1, beta2) -> None:
        """The reference update of one tensor, for layouts the fused kernel does not take."""
        step = float(state["step"])
        g = -grad if group["maximize"] else grad
        p.mul_(1.0 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(g, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        v = state["exp_avg_sq"]
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
            v = state["max_exp_avg_sq"]
        denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1.0 - beta1**step))
