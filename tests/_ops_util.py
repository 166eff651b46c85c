"""Shared helpers of the fastml.ops tests: the tolerance rule and backend fixtures."""

from __future__ import annotations

import torch

from fastml.ops.rms_norm import _rms_norm_ref

# The tolerance rule of issue #7: |fastml - ref| <= 2 * |torch_same_dtype - ref| + atol,
# where ref is computed in float64 from the same (already rounded) inputs. Two small
# terms keep it meaningful elementwise: one unit of rounding to the output dtype
# (an fp32-accumulated result may land on the other neighbour of the exact value;
# the unit is the dtype's spacing at |ref|, so below the smallest normal number, where
# fp16's spacing stops shrinking at 2**-24, it is that fixed spacing: softmax over
# 70,001 classes gives fp16 outputs near 1.4e-5, subnormal), and an atol of 1e-5 of
# the tensor's scale (cancellation in fp32 arithmetic).
_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# The floor for gradients that are a difference of larger terms (docs/ops.md,
# "Tolerances"). The backward of a normalisation is a projection,
# ``dx_j = rstd * (g_j - xhat_j * mean(g * xhat))``: when ``g`` is nearly parallel
# to ``xhat`` (always for a one-element row, where the exact result is
# ``g * eps * rstd**3``) the two terms cancel, and any fp32 evaluation, torch's
# included, is off by a few units of fp32 rounding of the terms, not of the
# result. So an element may also be off by ``TERMS_ULPS`` fp32 units of ``T_j``,
# the sum of the magnitudes of the terms the exact formula adds for it (the
# textbook bound for a computed sum). Measured at rows of 1-3 elements over 200
# seeds: fastml <= 6.3 and torch <= 6.6 units.
FP32_UNIT = 2.0**-24
TERMS_ULPS = 16


def rms_norm_terms(x: torch.Tensor, w: torch.Tensor | None, g: torch.Tensor, eps: float):
    """``T`` for RMSNorm's input gradient (float64): ``rstd * (|g w| + |xhat| mean|g w xhat|)``."""
    rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    xhat, gw = x * rstd, g * w if w is not None else g
    return rstd * (gw.abs() + xhat.abs() * (gw * xhat).abs().mean(-1, keepdim=True))


def layer_norm_terms(x: torch.Tensor, w: torch.Tensor | None, g: torch.Tensor, eps: float):
    """``T`` for LayerNorm's input gradient (float64):
    ``rstd * (|g w| + mean|g w| + |xhat| mean|g w xhat|)``."""
    xc = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
    xhat, gw = xc * rstd, g * w if w is not None else g
    a = gw.abs()
    return rstd * (
        a + a.mean(-1, keepdim=True) + xhat.abs() * (a * xhat.abs()).mean(-1, keepdim=True)
    )


def assert_rule(
    out: torch.Tensor,
    same: torch.Tensor,
    ref: torch.Tensor,
    what: str = "",
    norm: bool = False,
    terms: torch.Tensor | None = None,
) -> None:
    """The rule elementwise, or (``norm=True``) on the largest error of the tensor.

    ``terms``: the magnitudes ``T`` of the terms whose difference each element is
    (see ``TERMS_ULPS``); adds ``TERMS_ULPS`` fp32 units of ``T`` to the allowance.
    """
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, s, r = out.double(), same.double(), ref.double()
    scale = r.abs().max().item() if r.numel() else 0.0
    atol = 1e-5 * max(scale, 1e-3)
    fi = torch.finfo(out.dtype)
    sub = fi.tiny * fi.eps  # the spacing of subnormal numbers
    if norm:
        err, peer = (o - r).abs().max().item(), (s - r).abs().max().item()
        ulp = max(_EPS[out.dtype] * scale, sub)
        assert err <= 2.0 * peer + atol + ulp, (
            f"{what}: largest error {err:.3g} > 2 * {peer:.3g} (torch in the same dtype) + atol"
        )
        return
    allowed = 2.0 * (s - r).abs() + atol + (_EPS[out.dtype] * r.abs()).clamp_min(sub)
    if terms is not None:
        allowed = allowed + TERMS_ULPS * FP32_UNIT * terms.double().reshape(r.shape)
    err = (o - r).abs()
    bad = ~(err <= allowed) & ~(o.isnan() & r.isnan())
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements break the tolerance rule; "
            f"first at flat index {i}: fastml={o.reshape(-1)[i].item()!r} "
            f"ref={r.reshape(-1)[i].item()!r} torch_same_dtype={s.reshape(-1)[i].item()!r}"
        )


def grads(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, g.to(out.dtype)))


def leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_()


# ---------------------------------------------------------------- the comparison


def _outputs(r):
    return list(r) if isinstance(r, (tuple, list)) else [r]


def check_op(fast, same, ref, inputs, dtype, what, grad_mask=None, seed=0, norm=False, terms=None):
    """Compare fast/same (in ``dtype``) with ref (float64), forward and backward.

    ``terms(inputs64, upstream_grads64)`` returns ``{input index: T}`` for the
    gradients that are differences of larger terms (see ``_ops_util.TERMS_ULPS``).
    """
    gen = torch.Generator().manual_seed(seed)
    grad_mask = grad_mask or [True] * len(inputs)

    def cast(t, m, dt):
        if not t.is_floating_point():
            return t  # integer targets stay as they are
        return leaf(t, dt) if m else t.to(dt)

    xd = [cast(t, m, dtype) for t, m in zip(inputs, grad_mask, strict=True)]
    xs = [cast(t, m, dtype) for t, m in zip(inputs, grad_mask, strict=True)]
    x64 = [cast(t, m, torch.float64) for t, m in zip(xd, grad_mask, strict=True)]
    outs, sames, refs = _outputs(fast(*xd)), _outputs(same(*xs)), _outputs(ref(*x64))
    gs = [
        torch.randn(r.shape, generator=gen, dtype=torch.float64).to(device=r.device, dtype=dtype)
        for r in refs
    ]
    for i, (o, s, r) in enumerate(zip(outs, sames, refs, strict=True)):
        assert o.dtype == dtype, f"{what}: output dtype {o.dtype}"
        assert_rule(o, s, r, f"{what} output {i}", norm)
    wrt = [k for k, m in enumerate(grad_mask) if m]

    def backward(os_, xs_, gdtype):
        loss = sum((o * g.to(gdtype)).sum() for o, g in zip(os_, gs, strict=True))
        return torch.autograd.grad(loss, [xs_[k] for k in wrt])

    term_of = terms([t.detach() for t in x64], [g.double() for g in gs]) if terms else {}
    for k, go, gsm, gr in zip(
        wrt,
        backward(outs, xd, dtype),
        backward(sames, xs, dtype),
        backward(refs, x64, torch.float64),
        strict=True,
    ):
        assert go.dtype == dtype
        assert_rule(go, gsm, gr, f"{what} grad of input {k}", norm, term_of.get(k))


def add_rms_ref(dtype):
    """float64 add_rms_norm with its documented semantics: ``s`` is rounded to ``dtype``.

    The rounding is applied straight-through (its gradient is the identity), as
    the op's gradient treats the stored sum.
    """

    def ref(x, r, w, eps=1e-6):
        s = x + r
        s = s + (s.to(dtype).double() - s).detach()
        return _rms_norm_ref(s, w, eps), s

    return ref


def rms_terms(eps):
    return lambda xs, gs: {0: rms_norm_terms(xs[0], xs[1] if len(xs) > 1 else None, gs[0], eps)}


def add_rms_terms(dtype, eps=1e-6):
    def terms(xs, gs):
        s = (xs[0] + xs[1]).to(dtype).double()
        t = rms_norm_terms(s, xs[2], gs[0], eps) + gs[1].abs()
        return {0: t, 1: t}

    return terms


def ln_terms(eps):
    return lambda xs, gs: {0: layer_norm_terms(xs[0], xs[1] if len(xs) > 1 else None, gs[0], eps)}
