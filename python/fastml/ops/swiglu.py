"""Gated activations: ``swiglu(gate, up) = silu(gate) * up`` and ``geglu`` (GELU gate).

Elementwise over any shape; one read of each input and one write per pass.
"""

import math

import torch
from torch import Tensor

from fastml.ops._dispatch import (
    cdiv,
    check_float,
    check_same_device,
    differentiable,
    kernel_op,
    launch_config,
    opmath,
    tl,
    triton,
)

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_BLOCK = 1024


@triton.jit
def _gelu_and_grad(g, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        act = 0.5 * g * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * g * g
        )
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        act = g * cdf
        dact = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    return act, dact


@triton.jit
def _glu_fwd_kernel(G, U, Y, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    # KIND 0: silu gate; 1: exact GELU gate; 2: tanh-approximated GELU gate.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if KIND == 0:
        act = g * tl.sigmoid(g)
    else:
        act, _ = _gelu_and_grad(g, KIND == 2)
    tl.store(Y + offs, (act * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DY, G, U, DG, DU, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if KIND == 0:
        sig = tl.sigmoid(g)
        act = g * sig
        dact = sig * (1.0 + g * (1.0 - sig))
    else:
        act, dact = _gelu_and_grad(g, KIND == 2)
    tl.store(DG + offs, (dy * u * dact).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * act).to(DU.dtype.element_ty), mask=mask)


_KINDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


# (elements per program, warps): the default first, then larger programs (fewer
# of them: 16,384 x 4,096 is 65,536 programs of 1,024), tuned per size class.
_GLU_CANDIDATES = [(_BLOCK, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8), (8192, 16)]


def _glu_launch(name: str, kernel, args: tuple, n: int, kind: str, x: Tensor) -> None:
    def launch(config):  # repeatable: every output is a fresh buffer
        block, warps = config
        kernel[(cdiv(n, block),)](*args, n, KIND=_KINDS[kind], BLOCK=block, num_warps=warps)

    key = (x.dtype, kind, n.bit_length())
    launch(launch_config(name, x.device, key, _GLU_CANDIDATES, launch))


def glu_forward(gate: Tensor, up: Tensor, kind: str) -> Tensor:
    """Launch the forward kernel (``kind``: "silu" | "gelu" | "gelu_tanh")."""
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    n = g.numel()
    if n:
        _glu_launch("glu_fwd", _glu_fwd_kernel, (g, u, y), n, kind, g)
    return y


def glu_backward(dy: Tensor, gate: Tensor, up: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Launch the backward kernel: returns ``(dgate, dup)``."""
    d, g, u = dy.contiguous(), gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    if n:
        _glu_launch("glu_bwd", _glu_bwd_kernel, (d, g, u, dg, du), n, kind, g)
    return dg, du


def _act_and_grad_torch(g: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    if kind == "silu":
        sig = torch.sigmoid(g)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    if kind == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * g**3))
        dt = (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * g * g)
        return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * dt
    cdf = 0.5 * (1.0 + torch.erf(g * _SQRT1_2))
    return g * cdf, cdf + g * _INV_SQRT_2PI * torch.exp(-0.5 * g * g)


def _glu_forward_torch(gate: Tensor, up: Tensor, kind: str) -> Tensor:
    a = opmath(gate)
    act, _ = _act_and_grad_torch(gate.to(a), kind)
    return (act * up.to(a)).to(gate.dtype).contiguous()


def _glu_backward_torch(dy: Tensor, gate: Tensor, up: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    a = opmath(gate)
    act, dact = _act_and_grad_torch(gate.to(a), kind)
    dyf = dy.to(a)
    return (dyf * up.to(a) * dact).to(gate.dtype).contiguous(), (dyf * act).to(
        up.dtype
    ).contiguous()


def _swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    """``F.silu(gate) * up``: the test reference."""
    return torch.nn.functional.silu(gate) * up


def _geglu_ref(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(gate, approximate) * up``: the test reference."""
    return torch.nn.functional.gelu(gate, approximate=approximate) * up


# -- custom ops: opaque to torch.compile, with fake implementations and autograd --


def _glu_fwd_fake(gate, up, kind):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@kernel_op("glu_fwd", _glu_fwd_fake, glu_forward, _glu_forward_torch)
def _glu_fwd(gate: Tensor, up: Tensor, kind: str) -> Tensor: ...


def _glu_bwd_fake(dy, gate, up, kind):
    f = torch.contiguous_format
    return torch.empty_like(gate, memory_format=f), torch.empty_like(up, memory_format=f)


@kernel_op("glu_bwd", _glu_bwd_fake, glu_backward, _glu_backward_torch, key=1)
def _glu_bwd(dy: Tensor, gate: Tensor, up: Tensor, kind: str) -> tuple[Tensor, Tensor]: ...


def _glu_setup_context(ctx, inputs, output):
    gate, up, kind = inputs
    ctx.kind = kind
    ctx.save_for_backward(gate, up)


def _glu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = _glu_bwd.pick(ctx)(dy, gate, up, ctx.kind)
    return dg, du, None


_glu_apply = differentiable("_GLUFunction", _glu_fwd, _glu_setup_context, _glu_backward)


def _check(gate: Tensor, up: Tensor) -> None:
    check_float("gate", gate)
    check_float("up", up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"up must match gate's shape {tuple(gate.shape)} and dtype {gate.dtype}, "
            f"got {tuple(up.shape)} {up.dtype}"
        )
    check_same_device(gate=gate, up=up)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` elementwise (same shape and dtype; fp32 math)."""
    _check(gate, up)
    return _glu_apply(gate, up, "silu")


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """``gelu(gate) * up`` elementwise; ``approximate`` is "none" (erf) or "tanh" as in F.gelu."""
    _check(gate, up)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _glu_apply(gate, up, "gelu" if approximate == "none" else "gelu_tanh")
