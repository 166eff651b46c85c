"""Shared helpers of the fastml.ops tests: the tolerance rule and backend fixtures."""

from __future__ import annotations

import torch

# The tolerance rule of issue #7: |fastml - ref| <= 2 * |torch_same_dtype - ref| + atol,
# where ref is computed in float64 from the same (already rounded) inputs. Two small
# terms keep it meaningful elementwise: one unit of rounding to the output dtype
# (an fp32-accumulated result may land on the other neighbour of the exact value),
# and an atol of 1e-5 of the tensor's scale (cancellation in fp32 arithmetic).
_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_rule(
    out: torch.Tensor, same: torch.Tensor, ref: torch.Tensor, what: str = "", norm: bool = False
) -> None:
    """The rule elementwise, or (``norm=True``) on the largest error of the tensor."""
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
