"""Backend selection, the optional triton import, shared launch helpers, launch
tuning and the one registration path of every op (kernel_op, differentiable).

CUDA tensors run the Triton kernels, CPU tensors the torch reference with the
same semantics. ``set_backend`` forces one. Forcing ``"triton"`` on CPU tensors
needs ``TRITON_INTERPRET=1`` (set before triton is imported): that is how CI
exercises every kernel without a GPU.
"""

import functools
import os
import types
from collections.abc import Callable, Sequence
from typing import Any

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


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1). Host code uses this and
    :func:`cdiv` rather than ``triton.next_power_of_2`` / ``triton.cdiv``, which
    cost ~4 us per call from Python in triton 3.9 (constexpr-function wrappers)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``."""
    return -(-a // b)


def row_block(n: int, wide: bool = False) -> tuple[int, bool]:
    """Block width for rows of ``n`` elements and whether one block holds a row.

    ``wide``: kernels that hold one row and few accumulators (the forwards, the
    softmax backward) take blocks up to twice ``_MAX_BLOCK`` (16,384 columns in
    one pass: no spills at 16 warps, checked for sm_90a), where the norm
    backwards, which also hold dW, stay at ``_MAX_BLOCK``.
    """
    limit = 2 * _MAX_BLOCK if wide else _MAX_BLOCK
    block = min(next_pow2(n), limit) if HAS_TRITON else 1
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
    four programs per SM over all rows, and each as wide as that allows (up to
    one block): 64 x 131,072 gives 16 chunks of 8,192 per row, 1,024 programs.
    (The first version cut two chunks per SM *per row*: 16,384 programs of 512
    elements, each thread one 8-byte access.) ``(1, 0)``: no split.
    """
    if m <= 0 or n <= _MAX_BLOCK:
        return 1, 0
    sms = _sms(device)
    if m >= sms:
        return 1, 0
    per_row = -(-4 * sms // m)
    width = next_pow2(cdiv(n, per_row))
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


def persistent_programs(rows: int, device: torch.device, n: int = 1, per_sm: int = 4) -> int:
    """How many programs a backward kernel with per-program fp32 partial rows of ``n`` uses.

    ``per_sm`` per SM (four by default; the tuner tries fewer, since a program
    with many registers may not fit four to an SM and a second, mostly empty
    wave would follow); for very wide rows the count drops (not below one per
    SM) so the partial-sum buffer stays under 64 MiB.
    """
    if rows <= 0:
        return 1
    if device.type == "cuda":
        sms = _sm_count(device.index or 0)
        cap = max(sms, (64 << 20) // (4 * max(n, 1)))
        return max(1, min(rows, per_sm * sms, cap))
    return max(1, min(rows, per_sm))


# ---------------------------------------------------------------- tuning

# Launch configurations per shape class, chosen by timing the candidates on
# the first call of each class in a process (CUDA only; the first candidate,
# the heuristic default, everywhere else). Keys: (kernel, device, shape class).
_TUNED: dict[tuple, Any] = {}
_FORCED: dict[str, Any] = {}
_autotune = os.environ.get("FASTML_OPS_AUTOTUNE", "1") not in ("", "0")
# FASTML_OPS_TUNING_CACHE=path: choices also kept in a JSON file, keyed by the
# GPU's name and triton's version, so later processes reuse them (no tuning
# time, the same configuration run after run). Loaded once per path.
_FILE_CACHE: dict[str, dict[str, list]] = {}


def set_autotune(enabled: bool) -> None:
    """Turn the per-shape-class launch tuning on (the default) or off.

    On CUDA, the first call of a kernel for a new shape class (row-length
    bucket, dtype, and for backward kernels the row count's bucket) times a few
    launch configurations (rows per tile, warps, programs per SM) on the call's
    own tensors and keeps the fastest for the process; later calls of that class
    launch it directly. Off (or ``FASTML_OPS_AUTOTUNE=0``), every kernel uses its
    heuristic default. Tuning is also skipped, and the default used, while a
    CUDA graph is being captured and when
    ``torch.use_deterministic_algorithms(True)`` is set: configurations differ
    in reduction order, so the tuned choice (which can vary between processes)
    would change results in the last bits. Turning it off clears the cache.

    ``FASTML_OPS_TUNING_CACHE=path`` also keeps the choices in a JSON file,
    keyed by kernel, GPU name, triton version and shape class: later processes
    reuse them (no tuning time, the same configuration from run to run). An
    entry that is no longer among a kernel's candidates is ignored and retuned.
    """
    global _autotune
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _autotune = enabled
    if not enabled:
        _TUNED.clear()


def tuned_configs() -> dict[tuple, Any]:
    """A copy of the tuned launch configurations of this process, by (kernel, device, class)."""
    return dict(_TUNED)


def _time_config(launch: Callable[[Any], None], config: Any, reps: int = 5) -> float:
    """Milliseconds per launch of ``config`` (after one untimed launch that compiles)."""
    launch(config)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        launch(config)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def launch_config(
    kernel: str,
    device: torch.device,
    key: tuple,
    candidates: Sequence[Any],
    launch: Callable[[Any], None],
) -> Any:
    """The launch configuration for ``kernel`` on ``device`` for shape class ``key``.

    ``candidates[0]`` is the heuristic default. ``launch(config)`` must run the
    kernel on the call's tensors and be repeatable (outputs overwritten, inputs
    untouched); the caller launches the returned configuration itself.
    """
    forced = _FORCED.get(kernel)
    if forced is not None:
        return forced
    if torch.are_deterministic_algorithms_enabled() or device.type != "cuda":
        return candidates[0]
    full = (kernel, str(device), *key)
    hit = _TUNED.get(full)
    if hit is not None:
        return hit
    path = os.environ.get("FASTML_OPS_TUNING_CACHE", "")
    file_key = _file_key(kernel, device, key) if path else ""
    if path:
        saved = _load_tuning_file(path).get(file_key)
        stored = next((c for c in candidates if list(c) == saved), None) if saved else None
        if stored is not None:  # a choice that is still a candidate
            _TUNED[full] = stored
            return stored
    if (
        not _autotune
        or len(candidates) == 1
        or torch.cuda.is_current_stream_capturing()
        or compiling()
    ):
        return candidates[0]
    times = []
    for config in candidates:
        try:
            times.append((_time_config(launch, config), config))
        except Exception as exc:  # e.g. a configuration that exceeds the SM's resources
            if "OutOfResources" not in type(exc).__name__ and "out of resource" not in str(exc):
                raise
    best = min(times, key=lambda t: t[0])[1] if times else candidates[0]
    _TUNED[full] = best
    if path:
        _save_tuning(path, file_key, best)
    return best


def _file_key(kernel: str, device: torch.device, key: tuple) -> str:
    import triton as _triton  # only reached on CUDA, where triton is required

    name = torch.cuda.get_device_name(device)
    return "|".join([kernel, name, f"triton {_triton.__version__}", *map(str, key)])


def _load_tuning_file(path: str) -> dict[str, list]:
    if path not in _FILE_CACHE:
        import json

        data: Any = {}
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"FASTML_OPS_TUNING_CACHE file '{path}' is not a readable JSON object "
                    f"({exc}); delete it or point the variable elsewhere"
                ) from exc
            if not isinstance(data, dict):
                raise ValueError(
                    f"FASTML_OPS_TUNING_CACHE file '{path}' must hold a JSON object, "
                    f"got {type(data).__name__}"
                )
        _FILE_CACHE[path] = {k: v for k, v in data.items() if isinstance(v, list)}
    return _FILE_CACHE[path]


def _save_tuning(path: str, file_key: str, config: Any) -> None:
    """Add one choice to the file (read-merge-write through a temporary file and
    an atomic rename, so concurrent processes never leave it half written)."""
    import json
    import tempfile

    entries = _load_tuning_file(path)
    entries[file_key] = list(config)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fastml-tuning-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def launch_row_tiles(
    name: str,
    kernel: Any,
    args: tuple,
    m: int,
    block: int,
    one: bool,
    key: tuple,
    device: torch.device,
    **constexprs: Any,
) -> None:
    """Launch a row kernel with one program per tile of rows (the forwards, the
    softmax backward): ``kernel[(cdiv(m, ROWS),)](*args, BLOCK, ONE_BLOCK, ROWS,
    **constexprs)`` with ``(ROWS, warps)`` tuned per shape class ``key`` when a
    row fits one block. The kernel's outputs must be fresh buffers (repeatable)."""

    def launch(config: tuple[int, int, int]) -> None:
        rows, warps, _ = config
        kernel[(cdiv(m, rows),)](
            *args, BLOCK=block, ONE_BLOCK=one, ROWS=rows, num_warps=warps, **constexprs
        )

    candidates = tile_candidates(block, per_sm=(0,)) if one else [(1, num_warps(block), 0)]
    launch(launch_config(name, device, (block, m.bit_length(), *key), candidates, launch))


def launch_persistent_rows(
    name: str,
    kernel: Any,
    make_args: Callable[[int], tuple],
    m: int,
    n: int,
    block: int,
    one: bool,
    key: tuple,
    device: torch.device,
    **constexprs: Any,
) -> int:
    """Launch a persistent backward kernel over rows (one program per group of
    rows, dW partials per program): ``make_args(programs)`` gives the arguments
    for a grid of ``programs``; ``(ROWS, warps, programs per SM)`` is tuned per
    shape class ``key`` when a row fits one block (the kernel then stores, rather
    than accumulates, its partial rows: repeatable). Returns the grid size used."""
    used = [0]

    def launch(config: tuple[int, int, int]) -> None:
        rows, warps, per_sm = config
        used[0] = persistent_programs(m, device, n, per_sm)
        kernel[(used[0],)](
            *make_args(used[0]), BLOCK=block, ONE_BLOCK=one, ROWS=rows, num_warps=warps,
            **constexprs,
        )  # fmt: skip

    candidates = tile_candidates(block) if one else [(1, num_warps(block), 4)]
    launch(launch_config(name, device, (block, m.bit_length(), *key), candidates, launch))
    return used[0]


def tile_candidates(
    block: int, max_tile: int = 16384, per_sm: Sequence[int] = (4, 3, 2, 1)
) -> list[tuple[int, int, int]]:
    """``(rows per tile, warps, programs per SM)`` candidates for a persistent
    backward kernel over rows of one ``block``: the default first (one row per
    tile, the block's warps, four programs per SM), then tiles of up to
    ``max_tile`` elements (at most 16 rows) with the warps their size calls for
    (one-row tiles also at twice that), each at one to four programs per
    SM (the grid changes, not the compiled kernel). Kernels with one program
    per tile pass ``per_sm=(0,)`` (no grid choice)."""
    default = (1, num_warps(block), per_sm[0])
    out = [default]
    rows = 1
    while rows * block <= max_tile and rows <= 16:
        w = num_warps(rows * block)
        for warps in dict.fromkeys((w, min(16, 2 * w)) if rows == 1 else (w,)):
            for grid in per_sm:
                cand = (rows, warps, grid)
                if cand != default:
                    out.append(cand)
        rows *= 2
    return out


def launch_split(kernel: Any, grid: tuple, args: tuple, width: int, chunks: int = 0, **constexprs):
    """Launch one of the split-row kernels (see :func:`row_split`): ``grid`` is
    (row, chunk) or (chunk, row group) programs, each one column block of
    ``width`` (``BLOCK``, with its warps); ``chunks`` > 0 also passes ``CBLOCK``,
    the power of two that holds one row's chunk partials."""
    if chunks:
        constexprs["CBLOCK"] = next_pow2(chunks)
    kernel[grid](*args, BLOCK=width, num_warps=num_warps(width), **constexprs)


def opmath(t: torch.Tensor) -> torch.dtype:
    """The dtype the torch implementations compute in: float64 for float64
    tensors (which never take the fp32 kernels), float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_row_param(name: str, p: torch.Tensor | None, x: torch.Tensor) -> None:
    """``p`` (a weight or bias) is None or a float tensor of shape ``(x.shape[-1],)``."""
    if p is None:
        return
    check_float(name, p)
    if p.shape != x.shape[-1:]:
        raise ValueError(
            f"{name} must have shape ({x.shape[-1]},) to match x's last dimension, "
            f"got {tuple(p.shape)}"
        )


def check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


# ---------------------------------------------------------------- registration
#
# Every op is a pair of kernels (forward, backward), each registered once as a
# torch custom op (what torch.compile traces, with a fake implementation) whose
# implementation picks Triton or torch by the tensors, plus an eager
# autograd.Function over the same implementations (eager calls skip the custom
# op's dispatch). An op file holds its kernels, its torch reference and its
# autograd (setup_context, backward); kernel_op and differentiable do the rest.


class KernelOp:
    """One registered kernel: ``op`` the custom op ``torch.ops.fastml.<name>``,
    ``impl`` the function behind it (callable directly, without dispatch)."""

    __slots__ = ("impl", "op")

    def __init__(self, op: Any, impl: Callable) -> None:
        self.op = op
        self.impl = impl

    def __call__(self, *args: Any) -> Any:
        return self.op(*args)

    def pick(self, ctx: Any) -> Callable:
        """What an autograd backward calls: ``impl`` under the eager Function
        (``ctx.eager``), the custom op while torch.compile traces."""
        return self.impl if getattr(ctx, "eager", False) else self.op


def kernel_op(
    name: str,
    fake: Callable,
    triton_impl: Callable | None = None,
    torch_impl: Callable | None = None,
    key: int = 0,
) -> Callable[[Callable], KernelOp]:
    """Register the decorated function's signature as ``torch.ops.fastml.<name>``.

    With ``triton_impl`` and ``torch_impl``, the op runs ``triton_impl(*args)``
    when :func:`use_triton` accepts ``args[key]`` and ``torch_impl(*args)``
    otherwise (the decorated function is then only the signature); without
    them, the decorated function is the implementation. ``fake`` gives outputs
    of the right shapes and dtypes for tracing.
    """

    def register(signature: Callable) -> KernelOp:
        if triton_impl is None:
            impl = signature
        else:

            @functools.wraps(signature)
            def impl(*args: Any) -> Any:
                if use_triton(args[key]):
                    return triton_impl(*args)
                return torch_impl(*args)

        op = torch.library.custom_op(f"fastml::{name}", impl, mutates_args=())
        op.register_fake(fake)
        return KernelOp(op, impl)

    return register


def differentiable(
    name: str,
    forward: KernelOp,
    setup_context: Callable,
    backward: Callable,
    non_differentiable: Sequence[int] = (),
) -> Callable:
    """Attach autograd to ``forward`` and return the op's entry point.

    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` are
    torch's ``register_autograd`` pair; the backward calls its backward
    kernel through :meth:`KernelOp.pick`. The returned ``apply(*args)`` runs
    the custom op while torch.compile traces and an eager ``autograd.Function``
    named ``name`` otherwise; ``non_differentiable`` indexes outputs that
    carry no gradient.
    """
    forward.op.register_autograd(backward, setup_context=setup_context)
    function = eager_function(name, forward.impl, setup_context, backward, non_differentiable)

    def apply(*args: Any) -> Any:
        if compiling():
            return forward.op(*args)
        return function.apply(*args)

    apply.function = function  # type: ignore[attr-defined]
    return apply


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
