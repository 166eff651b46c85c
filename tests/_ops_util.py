"""Shared helpers of the fastml.ops tests: the tolerance rule and backend fixtures."""

from __future__ import annotations

import torch

# The tolerance rule of issue #7: |fastml - ref| <= 2 * |torch_same_dtype - ref| + atol,
# where ref is computed in float64 from the same (already rounded) inputs. Two small
# terms keep it meaningful elementwise: one unit of rounding to the output dtype
# (an fp32-accumulated result may land on the other neighbour of the exact value),
# and an atol of 1e-5 of the tensor's scale (cancellation in fp32 arithmetic).
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
    if norm:
        err, peer = (o - r).abs().max().item(), (s - r).abs().max().item()
        ulp = _EPS[out.dtype] * scale
        assert err <= 2.0 * peer + atol + ulp, (
            f"{what}: largest error {err:.3g} > 2 * {peer:.3g} (torch in the same dtype) + atol"
        )
        return
    allowed = 2.0 * (s - r).abs() + atol + _EPS[out.dtype] * r.abs()
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
