"""nn.Modules over the fused ops: drop-ins for torch.nn.RMSNorm / LayerNorm and a SwiGLU MLP."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastml.ops.layer_norm import layer_norm
from fastml.ops.rms_norm import rms_norm
from fastml.ops.swiglu import swiglu


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    shape = tuple(int(s) for s in normalized_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"normalized_shape must hold positive sizes, got {normalized_shape!r}")
    return shape


def _over_last(x: Tensor, shape: tuple[int, ...], fn, *params):
    """Apply a last-dimension op over the trailing ``shape`` dims of ``x``."""
    k = len(shape)
    if tuple(x.shape[x.dim() - k :]) != shape:
        raise ValueError(f"x's trailing dimensions must be {shape}, got {tuple(x.shape)}")
    if k == 1:
        return fn(x, *params)
    flat = [p.reshape(-1) if p is not None else None for p in params]
    y = fn(x.reshape(*x.shape[: x.dim() - k], math.prod(shape)), *flat)
    return y.reshape(x.shape)


class RMSNorm(nn.Module):
    """Drop-in for ``torch.nn.RMSNorm`` backed by :func:`fastml.ops.rms_norm`."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(
                torch.ones(self.normalized_shape, device=device, dtype=dtype)
            )
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return _over_last(
            x, self.normalized_shape, lambda a, w: rms_norm(a, w, self.eps), self.weight
        )

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


class LayerNorm(nn.Module):
    """Drop-in for ``torch.nn.LayerNorm`` backed by :func:`fastml.ops.layer_norm`."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **kw))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **kw))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return _over_last(
            x,
            self.normalized_shape,
            lambda a, w, b: layer_norm(a, w, b, self.eps),
            self.weight,
            self.bias,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


class SwiGLU(nn.Module):
    """The gated MLP of Llama-style blocks: ``down(silu(gate(x)) * up(x))``.

    ``gate_proj``/``up_proj`` map ``in_features`` to ``hidden_features`` and
    ``down_proj`` maps back to ``out_features`` (default ``in_features``); the
    activation and the product run as one fused :func:`fastml.ops.swiglu`.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        out_features = in_features if out_features is None else out_features
        self.gate_proj = nn.Linear(in_features, hidden_features, bias=bias, **kw)
        self.up_proj = nn.Linear(in_features, hidden_features, bias=bias, **kw)
        self.down_proj = nn.Linear(hidden_features, out_features, bias=bias, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
