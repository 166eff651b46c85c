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
    BLOCK_TENSOR,
    BLOCK_START,
    STEP_SIZE,
    BC2_SQRT,
    n_tensors,
    decay,
    beta1,
    beta2,
    eps,
    P_TY: tl.constexpr,
    G_TY: tl.constexpr,
    S_TY: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(BLOCK_TENSOR + pid).to(tl.int64)
    start = tl.load(BLOCK_START + pid)
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
    step_size = tl.load(STEP_SIZE + t)
    bc2_sqrt = tl.load(BC2_SQRT + t)
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
    """One fused AdamW update of tensors that share device and dtypes (contiguous)."""
    n = len(params)
    if n == 0:
        return
    device = params[0].device
    columns = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    ptrs = [t.data_ptr() for col in columns for t in col]
    numels = [p.numel() for p in params]
    blocks = [triton.cdiv(k, _BLOCK) for k in numels]
    step_size = [lr / (1.0 - beta1**s) for s in steps]
    bc2_sqrt = [math.sqrt(1.0 - beta2**s) for s in steps]
    ints = torch.tensor(ptrs + numels, dtype=torch.int64)
    floats = torch.tensor(step_size + bc2_sqrt, dtype=torch.float32)
    counts = torch.tensor(blocks, dtype=torch.int64)
    block_tensor = torch.repeat_interleave(torch.arange(n, dtype=torch.int32), counts)
    first = torch.cumsum(counts, 0) - counts
    block_start = (
        torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(first, counts)
    ) * _BLOCK
    if device.type != "cpu":
        # One pinned host buffer per table would save little: a step moves a few KB.
        ints, floats = ints.to(device, non_blocking=True), floats.to(device, non_blocking=True)
        block_tensor = block_tensor.to(device, non_blocking=True)
        block_start = block_start.to(device, non_blocking=True)
    table = ints[: len(ptrs)]
    _adamw_kernel[(block_tensor.numel(),)](
        table,
        ints[len(ptrs) :],
        block_tensor,
        block_start,
        floats[:n],
        floats[n:],
        n,
        1.0 - lr * weight_decay,
        beta1,
        beta2,
        eps,
        P_TY=_tl_dtype(params[0].dtype),
        G_TY=_tl_dtype(grads[0].dtype),
        S_TY=_tl_dtype(exp_avgs[0].dtype),
        AMSGRAD=amsgrad,
        MAXIMIZE=maximize,
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
            state["step"] += 1
            tensors = [p, state["exp_avg"], state["exp_avg_sq"]]
            if amsgrad:
                tensors.append(state["max_exp_avg_sq"])
            if not all(t.is_contiguous() for t in tensors) or p.dtype == torch.float64:
                self._single_step(p, grad, state, group, lr, beta1, beta2)
                continue
            grad = grad.contiguous()
            key = (p.device, p.dtype, grad.dtype, state["exp_avg"].dtype)
            buckets.setdefault(key, []).append(
                (
                    p,
                    grad,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state.get("max_exp_avg_sq"),
                    float(state["step"]),
                )
            )
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
