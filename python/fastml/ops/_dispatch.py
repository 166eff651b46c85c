"""Backend selection, the optional triton import and shared launch helpers.

CUDA tensors run the Triton kernels, CPU tensors the torch reference with the
same semantics. ``set_backend`` forces one. Forcing ``"triton"`` on CPU tensors
needs ``TRITON_INTERPRET=1`` (set before triton is imported): that is how CI
exercises every kernel without a GPU.
"""

import functools
import os
import types

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is part of the test extra
    HAS_TRITON = False

    class _MissingTriton:
        """Stands in for a jitted kernel when triton is not installed."""

        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(
                "fastml.ops needs triton to run its kernels on CUDA tensors: pip install triton"
            )

    triton = types.SimpleNamespace(jit=_MissingTriton, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=object)

_BACKENDS = ("auto", "triton", "torch")
_backend = "auto"

# The widest row block one program holds in registers; longer rows are walked
# in chunks of this size (no cliff at 65,536). Tests lower it to exercise the
# chunked paths on small shapes.
_MAX_BLOCK = 8192


def set_backend(name: str) -> None:
    """Force every fastml op onto one backend.

    ``"triton"`` runs the Triton kernels (CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``); ``"torch"`` runs the torch reference
    implementations; ``"auto"`` (the default) picks Triton for CUDA tensors and
    torch for CPU tensors.
    """
    global _backend
    if not isinstance(name, str) or name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The backend chosen with :func:`set_backend` (``"auto"`` by default)."""
    return _backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """Whether the op on tensor ``t`` runs the Triton kernel; raises when it cannot."""
    if _backend == "torch":
        return False
    if _backend == "auto" and not t.is_cuda:
        return False
    if t.dtype == torch.float64:  # the kernels accumulate in fp32; fp64 stays in torch
        return False
    if not HAS_TRITON:
        raise RuntimeError(
            "fastml.ops needs triton to run its kernels on CUDA tensors: pip install triton"
        )
    if not t.is_cuda and not _interpreting():
        raise RuntimeError(
            f"the triton backend got a {t.device.type} tensor; Triton kernels run on CUDA "
            "tensors, or on CPU tensors only under TRITON_INTERPRET=1 (set before importing "
            "triton); use set_backend('auto') or set_backend('torch') for CPU tensors"
        )
    return True


def row_block(n: int) -> tuple[int, bool]:
    """Block width for rows of ``n`` elements and whether one block holds a row."""
    block = min(triton.next_power_of_2(max(n, 1)), _MAX_BLOCK) if HAS_TRITON else 1
    return block, n <= block


# Split rows: the narrowest column chunk a program takes when a long row is
# split across programs (tests lower it with _MAX_BLOCK).
_SPLIT_MIN_BLOCK = 512


def _sms(device: torch.device) -> int:
    return _sm_count(device.index or 0) if device.type == "cuda" else 4


def row_split(m: int, n: int, device: torch.device) -> tuple[int, int]:
    """``(chunks, width)`` for kernels that split each row across programs.

    With fewer rows than SMs and rows wider than one block, one program per row
    leaves most SMs idle and each program walks its row serially (rows of 131,072
    elements used 4-23% of an H200's bandwidth). Then each row is cut into
    ``chunks`` column blocks of ``width`` (a power of two, one block each), about
    two per SM per row. ``(1, 0)``: no split.
    """
    if m <= 0 or n <= _MAX_BLOCK:
        return 1, 0
    sms = _sms(device)
    if m >= sms:
        return 1, 0
    target = max(1, n // (2 * sms))
    width = 1 << (target.bit_length() - 1)
    width = max(min(_SPLIT_MIN_BLOCK, _MAX_BLOCK), min(_MAX_BLOCK, width))
    return -(-n // width), width


def split_groups(m: int, chunks: int, device: torch.device) -> tuple[int, int]:
    """``(groups, rows per group)`` for a split backward kernel over ``chunks``
    column blocks: enough row groups that chunks x groups covers every SM twice."""
    groups = max(1, min(m, -(-2 * _sms(device) // max(chunks, 1))))
    rows = -(-m // groups)
    return -(-m // rows), rows


def num_warps(block: int) -> int:
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def as_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """A 2-D ``(rows, n)`` view of ``x`` with unit stride along a row.

    Copies only when no such view exists (e.g. a transposed input): row strides
    are passed to the kernels, so sliced or padded rows need no copy.
    """
    x2 = x.reshape(-1, n) if x.dim() != 2 else x
    if n > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {desc}")


@functools.cache
def _sm_count(index: int) -> int:
    # Cached: a device-property query per call costs microseconds we do not need to spend.
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(rows: int, device: torch.device, n: int = 1) -> int:
    """How many programs a backward kernel with per-program fp32 partial rows of ``n`` uses.

    Four per SM keeps every SM busy; for very wide rows the count drops (not
    below one per SM) so the partial-sum buffer stays under 64 MiB.
    """
    if rows <= 0:
        return 1
    if device.type == "cuda":
        sms = _sm_count(device.index or 0)
        cap = max(sms, (64 << 20) // (4 * max(n, 1)))
        return max(1, min(rows, 4 * sms, cap))
    return max(1, min(rows, 4))


def eager_function(name, forward_impl, setup_context, backward, non_differentiable=()):
    """An ``autograd.Function`` with the same forward, context and backward as a custom op.

    Eager calls go through it (a few microseconds per call) instead of the
    registered custom op (tens of microseconds of dispatch); ``torch.compile``
    traces the custom op instead. ``backward`` finds ``ctx.eager = True`` and
    then calls the backward implementation directly rather than the backward op.
    """

    def forward(ctx, *args):
        out = forward_impl(*args)
        setup_context(ctx, args, out)
        ctx.eager = True
        ctx.set_materialize_grads(False)
        outs = out if isinstance(out, tuple) else (out,)
        if non_differentiable:
            ctx.mark_non_differentiable(*(outs[i] for i in non_differentiable))
        return out

    # The kernels are not differentiable themselves: a double backward must raise
    # rather than silently drop the second-order terms.
    @torch.autograd.function.once_differentiable
    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    return type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(bwd)},
    )


def compiling() -> bool:
    """True while torch.compile/export traces: use the custom op, not the eager Function."""
    return torch.compiler.is_compiling()
