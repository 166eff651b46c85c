"""fastml.ops: every Triton kernel (under TRITON_INTERPRET=1 on CPU) against float64.

Each op runs forward and backward in fp32 and fp16 on fixed odd shapes and on
hypothesis-drawn ones, and must satisfy the tolerance rule of issue #7
(see tests/_ops_util.py) for outputs and gradients alike.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F
from _hyp import examples
from _ops_util import add_rms_ref, add_rms_terms, assert_rule, check_op, ln_terms, rms_terms
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastml import ops
from fastml.ops import _dispatch
from fastml.ops.cross_entropy import _cross_entropy_ref
from fastml.ops.layer_norm import _layer_norm_ref
from fastml.ops.rms_norm import _rms_norm_ref
from fastml.ops.softmax import _log_softmax_ref, _softmax_ref

# The package re-exports the function under the module's name; fetch the module itself.
lce_mod = importlib.import_module("fastml.ops.linear_cross_entropy")

DTYPES = [torch.float32, torch.float16]
# (5, 4097): more rows than the CPU's stand-in SM count (4), so chunked mode walks
# whole rows per program; few long rows split across programs (row_split) have
# their own tests below.
SHAPES = [(1, 1), (5, 123), (5, 4097), (2, 3, 37), (6, 1500)]


@pytest.fixture
def triton_backend():
    _dispatch.set_backend("triton")
    yield
    _dispatch.set_backend("auto")


@pytest.fixture(params=["one_block", "chunked"])
def block_mode(request, monkeypatch):
    """Run with rows in one block, and with a 1024-wide block so 4097 is walked in
    chunks and 1500 takes the two-block backward of the norms."""
    if request.param == "chunked":
        monkeypatch.setattr(_dispatch, "_MAX_BLOCK", 1024)
    return request.param


# ---------------------------------------------------------------- norms


def _spy_splits(monkeypatch, module: str) -> list[int]:
    """Blocks of 64 and split chunks of at least 16 (so small shapes take the
    split-rows path); returns the chunk counts the op's row_split calls chose."""
    monkeypatch.setattr(_dispatch, "_MAX_BLOCK", 64)
    monkeypatch.setattr(_dispatch, "_SPLIT_MIN_BLOCK", 16)
    splits: list[int] = []

    def spy(m, n, device):
        out = _dispatch.row_split(m, n, device)
        splits.append(out[0])
        return out

    monkeypatch.setattr(importlib.import_module(module), "row_split", spy)
    return splits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm(triton_backend, block_mode, dtype, shape):
    torch.manual_seed(1)
    x, w = torch.randn(shape), torch.randn(shape[-1])
    check_op(
        lambda a, b: ops.rms_norm(a, b, 1e-6),
        lambda a, b: F.rms_norm(a, (shape[-1],), b, 1e-6),
        lambda a, b: _rms_norm_ref(a, b, 1e-6),
        [x, w],
        dtype,
        "rms_norm",
        terms=rms_terms(1e-6),
    )


# (rows per tile, warps, programs per SM): tiles that leave a partial last tile
# and programs with no rows (4 stand-in SMs on CPU).
TILES = [(2, 4, 1), (4, 4, 2), (16, 8, 3)]
TUNED_KERNELS = (
    "rms_norm_fwd",
    "rms_norm_bwd",
    "layer_norm_fwd",
    "layer_norm_bwd",
    "softmax_fwd",
    "softmax_bwd",
)


@contextlib.contextmanager
def _triton_with_tile(tile):
    """The triton backend, every tuned kernel forced to ``tile`` (None: defaults)."""
    _dispatch.set_backend("triton")
    if tile is not None:
        _dispatch._FORCED.update(dict.fromkeys(TUNED_KERNELS, tile))
    try:
        yield
    finally:
        _dispatch.set_backend("auto")
        for kernel in TUNED_KERNELS:
            _dispatch._FORCED.pop(kernel, None)


def _check_norms(x, r, w, b, dtype, seed=0):
    """rms_norm, layer_norm and add_rms_norm (eps 1e-6 / 1e-5) against torch and float64."""
    n = x.shape[-1]
    check_op(
        lambda a, c: ops.rms_norm(a, c, 1e-6),
        lambda a, c: F.rms_norm(a, (n,), c, 1e-6),
        lambda a, c: _rms_norm_ref(a, c, 1e-6),
        [x, w],
        dtype,
        "rms_norm",
        seed=seed,
        terms=rms_terms(1e-6),
    )
    check_op(
        ops.layer_norm,
        lambda a, c, d: F.layer_norm(a, (n,), c, d),
        _layer_norm_ref,
        [x, w, b],
        dtype,
        "layer_norm",
        seed=seed,
        terms=ln_terms(1e-5),
    )
    check_op(
        lambda a, q, c: ops.add_rms_norm(a, q, c, 1e-6),
        lambda a, q, c: (F.rms_norm(a + q, (n,), c, 1e-6), a + q),
        add_rms_ref(dtype),
        [x, r, w],
        dtype,
        "add_rms_norm",
        seed=seed,
        terms=add_rms_terms(dtype),
    )


@pytest.mark.parametrize("tile", TILES, ids=str)
@pytest.mark.parametrize("shape", [(37, 123), (5, 64), (2, 3, 37), (1, 1)], ids=str)
def test_row_tiles(triton_backend, monkeypatch, tile, shape):
    """The tuned configurations (several rows per tile, other warps and grids)
    give the same outputs and gradients as the reference, for every norm and
    softmax, forward and backward."""
    for kernel in TUNED_KERNELS:
        monkeypatch.setitem(_dispatch._FORCED, kernel, tile)
    torch.manual_seed(3)
    n = shape[-1]
    x, r = torch.randn(shape), torch.randn(shape)
    w, b = torch.randn(n), torch.randn(n)
    dtype = torch.float32
    _check_norms(x, r, w, b, dtype)
    for log in (False, True):
        fast = ops.log_softmax if log else ops.softmax
        same = torch.log_softmax if log else torch.softmax
        check_op(
            lambda a, fast=fast: fast(a, -1),
            lambda a, same=same: same(a, -1),
            _log_softmax_ref if log else _softmax_ref,
            [x * 3],
            dtype,
            "log_softmax" if log else "softmax",
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_without_weight(triton_backend, dtype):
    x = torch.randn(4, 50)
    check_op(
        lambda a: ops.rms_norm(a, None, 1e-5),
        lambda a: F.rms_norm(a, (50,), None, 1e-5),
        lambda a: _rms_norm_ref(a, None, 1e-5),
        [x],
        dtype,
        "rms_norm(weight=None)",
        terms=rms_terms(1e-5),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm(triton_backend, block_mode, dtype, shape):
    torch.manual_seed(2)
    x, r, w = torch.randn(shape), torch.randn(shape), torch.randn(shape[-1])

    def same(a, b, c):
        s = a + b
        return F.rms_norm(s, (shape[-1],), c, 1e-6), s

    check_op(
        lambda a, b, c: ops.add_rms_norm(a, b, c, 1e-6),
        same,
        add_rms_ref(dtype),
        [x, r, w],
        dtype,
        "add_rms_norm",
        terms=add_rms_terms(dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 300), (1, 1000), (2, 65), (2, 1, 129)], ids=str)
@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_split_rows(triton_backend, monkeypatch, dtype, shape, weight):
    """Few long rows: each row split across programs (forward: chunk sums of
    squares, then each chunk normalised; backward: chunk dot products, then dx
    per chunk and dW per row group), ragged last chunks, with and without a
    residual and a weight."""
    splits = _spy_splits(monkeypatch, "fastml.ops.rms_norm")
    torch.manual_seed(4)
    n = shape[-1]
    x, r = torch.randn(shape), torch.randn(shape)
    w = torch.randn(n) if weight else None
    args = [x, w] if weight else [x]
    check_op(
        lambda a, b=None: ops.rms_norm(a, b, 1e-6),
        lambda a, b=None: F.rms_norm(a, (n,), b, 1e-6),
        lambda a, b=None: _rms_norm_ref(a, b, 1e-6),
        args,
        dtype,
        "rms_norm (split rows)",
        terms=rms_terms(1e-6),
    )
    assert splits and all(c > 1 for c in splits), splits  # forward and backward split

    def same(a, b, c=None):
        s = a + b
        return F.rms_norm(s, (n,), c, 1e-6), s

    ref = add_rms_ref(dtype)
    terms = add_rms_terms(dtype)
    check_op(
        lambda a, b, c=None: ops.add_rms_norm(a, b, c, 1e-6),
        same,
        lambda a, b, c=None: ref(a, b, c),
        [x, r, w] if weight else [x, r],
        dtype,
        "add_rms_norm (split rows)",
        terms=lambda xs, gs: terms(xs if weight else [*xs, None], gs),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 300), (1, 1000), (2, 65), (2, 1, 129)], ids=str)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_split_rows(triton_backend, monkeypatch, dtype, shape, affine):
    """Few long rows split across programs: chunk means and M2s combined in
    the apply kernel (an offset mean that a sum of squares would cancel),
    ragged last chunks; backward chunk sums, dx per chunk, dW/dB per group."""
    splits = _spy_splits(monkeypatch, "fastml.ops.layer_norm")
    torch.manual_seed(6)
    n = shape[-1]
    x = torch.randn(shape) * 2 + 30
    w, b = torch.randn(n), torch.randn(n)
    args = {"both": [x, w, b], "weight": [x, w], "none": [x]}[affine]
    check_op(
        lambda a, c=None, d=None: ops.layer_norm(a, c, d, 1e-5),
        lambda a, c=None, d=None: F.layer_norm(a, (n,), c, d, 1e-5),
        lambda a, c=None, d=None: _layer_norm_ref(a, c, d, 1e-5),
        args,
        dtype,
        "layer_norm (split rows)",
        terms=ln_terms(1e-5),
    )
    assert splits and all(c > 1 for c in splits), splits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm(triton_backend, block_mode, dtype, shape):
    torch.manual_seed(3)
    # An offset mean: a one-pass sum of squares would lose digits here.
    x, w, b = torch.randn(shape) * 2 + 3, torch.randn(shape[-1]), torch.randn(shape[-1])
    n = shape[-1]
    check_op(
        lambda a, c, d: ops.layer_norm(a, c, d, 1e-5),
        lambda a, c, d: F.layer_norm(a, (n,), c, d, 1e-5),
        lambda a, c, d: _layer_norm_ref(a, c, d, 1e-5),
        [x, w, b],
        dtype,
        "layer_norm",
        terms=ln_terms(1e-5),
    )


@pytest.mark.parametrize("affine", ["weight_only", "none"])
def test_layer_norm_optional_affine(triton_backend, affine):
    x, w = torch.randn(3, 70), torch.randn(70)
    if affine == "weight_only":
        args, fast = [x, w], lambda a, c: ops.layer_norm(a, c, None)
        same = lambda a, c: F.layer_norm(a, (70,), c, None)  # noqa: E731
        ref = lambda a, c: _layer_norm_ref(a, c, None)  # noqa: E731
    else:
        args, fast = [x], lambda a: ops.layer_norm(a)
        same = lambda a: F.layer_norm(a, (70,))  # noqa: E731
        ref = lambda a: _layer_norm_ref(a, None, None)  # noqa: E731
    check_op(fast, same, ref, args, torch.float32, f"layer_norm({affine})", terms=ln_terms(1e-5))


# ---------------------------------------------------------------- softmax


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax(triton_backend, block_mode, dtype, shape, log):
    torch.manual_seed(4)
    x = torch.randn(shape) * 3
    fast = ops.log_softmax if log else ops.softmax
    same = torch.log_softmax if log else torch.softmax
    ref = _log_softmax_ref if log else _softmax_ref
    check_op(
        lambda a: fast(a, -1),
        lambda a: same(a, -1),
        lambda a: ref(a, -1),
        [x],
        dtype,
        fast.__name__,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 300), (1, 1000), (2, 65), (2, 1, 129)], ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_split_rows(triton_backend, monkeypatch, dtype, shape, log):
    """Few long rows split across programs: chunk maxima and sums combined in
    the apply kernel, chunk dot products in the backward, ragged last chunks."""
    splits = _spy_splits(monkeypatch, "fastml.ops.softmax")
    torch.manual_seed(7)
    x = torch.randn(shape) * 4
    fast = ops.log_softmax if log else ops.softmax
    same = torch.log_softmax if log else torch.softmax
    ref = _log_softmax_ref if log else _softmax_ref
    check_op(
        lambda a: fast(a, -1),
        lambda a: same(a, -1),
        lambda a: ref(a, -1),
        [x],
        dtype,
        f"{fast.__name__} (split rows)",
    )
    assert splits and all(c > 1 for c in splits), splits


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_softmax_other_dims(triton_backend, dim):
    x = torch.randn(6, 5, 4)
    for fast, same, ref in (
        (ops.softmax, torch.softmax, _softmax_ref),
        (ops.log_softmax, torch.log_softmax, _log_softmax_ref),
    ):
        check_op(
            lambda a, f=fast: f(a, dim),
            lambda a, s=same: s(a, dim),
            lambda a, r=ref: r(a, dim),
            [x],
            torch.float32,
            f"{fast.__name__}(dim={dim})",
        )


@pytest.mark.parametrize("rows", [2, 6], ids=["split", "chunked"])
def test_softmax_masked_rows(triton_backend, monkeypatch, rows):
    # A chunk of -inf before the finite values: the online max (chunked rows)
    # and the chunk maxima (split rows) must not turn into nan.
    monkeypatch.setattr(_dispatch, "_MAX_BLOCK", 16)
    monkeypatch.setattr(_dispatch, "_SPLIT_MIN_BLOCK", 16)
    x = torch.randn(rows, 50)
    x[0, :20] = float("-inf")
    torch.testing.assert_close(ops.softmax(x), torch.softmax(x, -1))
    torch.testing.assert_close(ops.log_softmax(x)[:, 20:], torch.log_softmax(x, -1)[:, 20:])


# ---------------------------------------------------------------- cross entropy


def _ce_case(n: int, c: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=gen) * 2
    target = torch.randint(0, c, (n,), generator=gen)
    if n > 1:
        target[1] = -100
    return logits, target


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# (3, 4097) in chunked mode: few long rows, split across programs (row_split);
# (5, 4097): one program walks each row.
@pytest.mark.parametrize("shape", [(1, 1), (5, 123), (3, 4097), (5, 4097)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(triton_backend, block_mode, dtype, shape, reduction, smoothing):
    logits, target = _ce_case(*shape, seed=5)
    kw = {"reduction": reduction, "label_smoothing": smoothing}
    check_op(
        lambda a, t: ops.cross_entropy(a, t, **kw),
        lambda a, t: F.cross_entropy(a, t, **kw),
        lambda a, t: F.cross_entropy(a, t, **kw),
        [logits, target],
        dtype,
        f"cross_entropy({reduction}, {smoothing})",
        grad_mask=[True, False],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 300), (1, 1000), (2, 65)], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_split_rows(triton_backend, monkeypatch, dtype, shape, smoothing):
    """Few long rows split across programs: chunk max / sum-exp / sum combined
    per row, the gradient written chunk by chunk; an ignored row."""
    splits = _spy_splits(monkeypatch, "fastml.ops.cross_entropy")
    logits, target = _ce_case(*shape, seed=9)
    kw = {"reduction": "sum", "label_smoothing": smoothing}
    check_op(
        lambda a, t: ops.cross_entropy(a, t, **kw),
        lambda a, t: F.cross_entropy(a, t, **kw),
        lambda a, t: F.cross_entropy(a, t, **kw),
        [logits, target],
        dtype,
        f"cross_entropy (split rows, {smoothing})",
        grad_mask=[True, False],
    )
    assert splits and all(c > 1 for c in splits), splits


def test_cross_entropy_leading_dims_and_ignore_index(triton_backend):
    logits = torch.randn(2, 3, 11)
    target = torch.randint(0, 11, (2, 3))
    target[0, 1] = 7
    check_op(
        lambda a, t: ops.cross_entropy(a, t, ignore_index=7, reduction="none"),
        lambda a, t: _cross_entropy_ref(a, t, ignore_index=7, reduction="none"),
        lambda a, t: _cross_entropy_ref(a, t, ignore_index=7, reduction="none"),
        [logits, target],
        torch.float32,
        "cross_entropy (B, T, C)",
        grad_mask=[True, False],
    )
    all_ignored = torch.full((2, 3), 7)
    assert ops.cross_entropy(logits, all_ignored, ignore_index=7).isnan()  # 0/0, as torch


@pytest.mark.parametrize("config", [(16, 4), (64, 8), (256, 16)], ids=str)
def test_cross_entropy_tuned_configs(triton_backend, monkeypatch, config):
    """The cross-entropy kernel's tuned (block, warps) configurations — here
    blocks narrower and wider than the rows — give the reference's loss and
    gradient, with ignored rows and smoothing."""
    monkeypatch.setitem(_dispatch._FORCED, "cross_entropy_fwd", config)
    monkeypatch.setitem(_dispatch._FORCED, "cross_entropy_bwd", config)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(7, 123, generator=gen)
    t = torch.randint(0, 123, (7,), generator=gen)
    t[2] = -100
    check_op(
        lambda a, b: ops.cross_entropy(a, b, label_smoothing=0.05, reduction="none"),
        lambda a, b: F.cross_entropy(a, b, label_smoothing=0.05, reduction="none"),
        lambda a, b: _cross_entropy_ref(a, b, label_smoothing=0.05, reduction="none"),
        [x, t],
        torch.float32,
        "cross_entropy",
        grad_mask=[True, False],
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_reduction_in_one_node(triton_backend, reduction):
    """The eager Triton path reduces the rows in one launch and backpropagates
    through one autograd node (the mean's division happens in the gradient
    kernel), matching torch, including ignored rows and smoothing."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(37, 19, generator=gen, requires_grad=True)
    t = torch.randint(0, 19, (37,), generator=gen)
    t[::5] = -100
    y = ops.cross_entropy(x, t, label_smoothing=0.1, reduction=reduction)
    assert "CrossEntropyReduced" in y.grad_fn.name()
    assert y.dtype == x.dtype and y.dim() == 0
    (y * 3).backward()
    xr = x.detach().double().requires_grad_()
    want = F.cross_entropy(xr, t, label_smoothing=0.1, reduction=reduction)
    (want * 3).backward()
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- gated activations


@pytest.mark.parametrize("config", [(2048, 4), (8192, 16)], ids=str)
def test_glu_tuned_configs(triton_backend, monkeypatch, config):
    """The gated activations' tuned configurations (elements per program, warps)
    give the reference's outputs and gradients, with a ragged last program."""
    monkeypatch.setitem(_dispatch._FORCED, "glu_fwd", config)
    monkeypatch.setitem(_dispatch._FORCED, "glu_bwd", config)
    torch.manual_seed(6)
    g, u = torch.randn(3, 4099), torch.randn(3, 4099)
    check_op(
        ops.swiglu,
        lambda a, b: F.silu(a) * b,
        lambda a, b: F.silu(a.double()) * b.double(),
        [g, u],
        torch.float32,
        "swiglu",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["swiglu", "geglu", "geglu_tanh"])
def test_glu(triton_backend, dtype, shape, kind):
    torch.manual_seed(6)
    g, u = torch.randn(shape) * 2, torch.randn(shape)
    if kind == "swiglu":
        fast, same = ops.swiglu, lambda a, b: F.silu(a) * b
    elif kind == "geglu":
        fast, same = ops.geglu, lambda a, b: F.gelu(a) * b
    else:
        fast = lambda a, b: ops.geglu(a, b, approximate="tanh")  # noqa: E731
        same = lambda a, b: F.gelu(a, approximate="tanh") * b  # noqa: E731
    check_op(fast, same, same, [g, u], dtype, kind)


# ---------------------------------------------------------------- linear cross entropy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_linear_cross_entropy(triton_backend, monkeypatch, dtype, reduction, with_bias):
    monkeypatch.setattr(lce_mod, "_CHUNK_ROWS", 4)  # 11 rows: chunks of 4, 4, 3
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(11, 24, generator=gen), torch.randn(37, 24, generator=gen) * 0.3
    b = torch.randn(37, generator=gen)
    target = torch.randint(0, 37, (11,), generator=gen)
    target[[0, 5, 6]] = -100
    if with_bias:

        def fast(a, c, d, t):  # the loss is float32 (a reduction); compared in a's dtype
            return ops.linear_cross_entropy(a, c, t, d, reduction=reduction).to(a.dtype)

        def same(a, c, d, t):
            return F.cross_entropy(a @ c.T + d, t, reduction=reduction)

        args, mask = [x, w, b, target], [True, True, True, False]
    else:

        def fast(a, c, t):
            return ops.linear_cross_entropy(a, c, t, reduction=reduction).to(a.dtype)

        def same(a, c, t):
            return F.cross_entropy(a @ c.T, t, reduction=reduction)

        args, mask = [x, w, target], [True, True, False]
    # In fp16 both fastml and eager torch round the logits to fp16, and that shared
    # rounding dominates their error against float64: elementwise, the comparison
    # would measure which of two correlated noises is smaller at each element. So in
    # fp16 the rule is applied to each tensor's largest error (norm=True).
    check_op(
        fast,
        same,
        same,
        args,
        dtype,
        f"linear_cross_entropy({reduction})",
        grad_mask=mask,
        norm=dtype == torch.float16,
    )


def test_linear_cross_entropy_leading_dims_default_chunks(triton_backend):
    x, w = torch.randn(2, 3, 8), torch.randn(13, 8)
    target = torch.randint(0, 13, (2, 3))
    check_op(
        lambda a, c, t: ops.linear_cross_entropy(a, c, t, ignore_index=2),
        lambda a, c, t: lce_mod._lce_ref(a, c, t, ignore_index=2),
        lambda a, c, t: lce_mod._lce_ref(a, c, t, ignore_index=2),
        [x, w, target],
        torch.float32,
        "linear_cross_entropy (B, T, H)",
        grad_mask=[True, True, False],
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_loss_is_float32(triton_backend, reduction):
    """The loss is a reduction: returned in fp32 (not rounded to x's dtype), so
    in half precision it matches float64 of the same half-precision logits far
    better than a half-precision loss could."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 16, generator=gen).half()
    w = (torch.randn(300, 16, generator=gen) * 0.5).half()
    t = torch.randint(0, 300, (64,), generator=gen)
    got = ops.linear_cross_entropy(x, w, t, reduction=reduction)
    assert got.dtype == torch.float32
    want = F.cross_entropy((x @ w.T).double(), t, reduction=reduction)
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=1e-4)
    if reduction != "none":
        assert abs(got.double() - want) < abs(want.half().double() - want) + 1e-3


def test_linear_cross_entropy_without_grad(triton_backend):
    x, w = torch.randn(5, 8), torch.randn(13, 8)
    t = torch.randint(0, 13, (5,))
    with torch.no_grad():
        got = ops.linear_cross_entropy(x, w, t)
    torch.testing.assert_close(got, F.cross_entropy(x @ w.T, t))


# ---------------------------------------------------------------- long rows, strides


def test_rows_longer_than_65536(triton_backend):
    # One row past the old single-block cliff (65,536), walked in 8192-wide chunks.
    n = 70_001
    torch.manual_seed(8)
    x, w = torch.randn(1, n), torch.randn(n)
    check_op(
        lambda a, c: ops.rms_norm(a, c),
        lambda a, c: F.rms_norm(a, (n,), c, 1e-6),
        lambda a, c: _rms_norm_ref(a, c),
        [x, w],
        torch.float32,
        "rms_norm 70001",
    )
    check_op(
        ops.log_softmax,
        lambda a: torch.log_softmax(a, -1),
        _log_softmax_ref,
        [x],
        torch.float32,
        "log_softmax 70001",
    )
    target = torch.tensor([n - 3])
    check_op(
        lambda a, t: ops.cross_entropy(a, t, label_smoothing=0.05),
        lambda a, t: F.cross_entropy(a, t, label_smoothing=0.05),
        lambda a, t: F.cross_entropy(a, t, label_smoothing=0.05),
        [x, target],
        torch.float32,
        "cross_entropy 70001",
        grad_mask=[True, False],
    )
    y = ops.layer_norm(x + 5, w, None)
    assert_rule(
        y, F.layer_norm(x + 5, (n,), w), _layer_norm_ref((x + 5).double(), w.double(), None)
    )


def test_strided_inputs(triton_backend):
    base = torch.randn(6, 300)
    padded = base[:, :123]  # row stride 300: read in place
    every_other = base[:, ::2]  # element stride 2: copied once
    w = torch.randn(123)
    for x in (padded, every_other[:, :123]):
        assert not x.is_contiguous()
        torch.testing.assert_close(ops.rms_norm(x, w), F.rms_norm(x, (123,), w, 1e-6))
        torch.testing.assert_close(ops.layer_norm(x, w), F.layer_norm(x, (123,), w))
        torch.testing.assert_close(ops.softmax(x), torch.softmax(x, -1))
    t = base[:, :50].t()  # (50, 6) transposed
    torch.testing.assert_close(ops.softmax(t, 0), torch.softmax(t, 0))
    torch.testing.assert_close(ops.swiglu(t, t), F.silu(t) * t)
    # An expanded (stride-0) upstream gradient, as from y.sum().
    x = padded.clone().requires_grad_()
    ops.rms_norm(x, w).sum().backward()
    xr = padded.clone().requires_grad_()
    F.rms_norm(xr, (123,), w, 1e-6).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- hypothesis


@st.composite
def _shapes(draw):
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    return (*lead, draw(st.integers(1, 300)))


@settings(max_examples=examples(12))
@given(
    shape=_shapes(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    tile=st.sampled_from([None, *TILES]),
)
# A one-element row: the input gradient is all cancellation (issue #13).
@example(shape=(1,), dtype=torch.float32, seed=7, tile=None)
@example(shape=(1, 1), dtype=torch.float32, seed=0, tile=None)
def test_norms_hypothesis(shape, dtype, seed, tile):
    with _triton_with_tile(tile):  # tile: a tuned configuration for every tuned kernel
        gen = torch.Generator().manual_seed(seed)
        x, r = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        w, b = torch.randn(shape[-1], generator=gen), torch.randn(shape[-1], generator=gen)
        _check_norms(x, r, w, b, dtype, seed=seed)


@settings(max_examples=examples(12))
@given(
    shape=_shapes(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    tile=st.sampled_from([None, *TILES]),
)
def test_softmax_ce_glu_hypothesis(shape, dtype, seed, tile):
    with _triton_with_tile(tile):
        gen = torch.Generator().manual_seed(seed)
        x, u = torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen)
        check_op(
            ops.softmax,
            lambda a: torch.softmax(a, -1),
            _softmax_ref,
            [x],
            dtype,
            "softmax",
            seed=seed,
        )
        check_op(
            ops.swiglu,
            lambda a, b: F.silu(a) * b,
            lambda a, b: F.silu(a) * b,
            [x, u],
            dtype,
            "swiglu",
            seed=seed,
        )
        target = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        check_op(
            lambda a, t: ops.cross_entropy(a, t, label_smoothing=0.1),
            lambda a, t: _cross_entropy_ref(a, t, label_smoothing=0.1),
            lambda a, t: _cross_entropy_ref(a, t, label_smoothing=0.1),
            [x, target],
            dtype,
            "cross_entropy",
            grad_mask=[True, False],
            seed=seed,
        )


# ---------------------------------------------------------------- the CPU fallbacks


@pytest.mark.parametrize("dtype", [*DTYPES, torch.bfloat16], ids=str)
def test_torch_backend_rule(dtype):
    # Default backend on CPU tensors: the torch implementations, same rule. (bf16
    # through the Triton kernels is a GPU test: the interpreter converts fp32 to
    # bf16 by truncation, where GPUs round to nearest.)
    _all_ops_rule(dtype)


def _all_ops_rule(dtype):
    torch.manual_seed(9)
    x, r, w, b = torch.randn(5, 123) + 1, torch.randn(5, 123), torch.randn(123), torch.randn(123)
    t = torch.randint(0, 123, (5,))
    t[2] = -100
    check_op(
        ops.rms_norm,
        lambda a, c: F.rms_norm(a, (123,), c, 1e-6),
        _rms_norm_ref,
        [x, w],
        dtype,
        "rms_norm",
    )
    check_op(
        ops.layer_norm,
        lambda a, c, d: F.layer_norm(a, (123,), c, d),
        _layer_norm_ref,
        [x, w, b],
        dtype,
        "ln",
    )
    check_op(
        ops.add_rms_norm,
        lambda a, q, c: (F.rms_norm(a + q, (123,), c, 1e-6), a + q),
        add_rms_ref(dtype),
        [x, r, w],
        dtype,
        "add_rms_norm",
        terms=add_rms_terms(dtype),
    )
    check_op(
        ops.log_softmax,
        lambda a: torch.log_softmax(a, -1),
        _log_softmax_ref,
        [x],
        dtype,
        "log_softmax",
    )
    check_op(
        lambda a, q: ops.cross_entropy(a, q, label_smoothing=0.1),
        lambda a, q: F.cross_entropy(a, q, label_smoothing=0.1),
        lambda a, q: F.cross_entropy(a, q, label_smoothing=0.1),
        [x, t],
        dtype,
        "cross_entropy",
        grad_mask=[True, False],
    )
    check_op(
        ops.geglu, lambda a, c: F.gelu(a) * c, lambda a, c: F.gelu(a) * c, [x, r], dtype, "geglu"
    )


def test_linear_cross_entropy_half_dw_in_weight_dtype(triton_backend, monkeypatch):
    # The large-head path: dW summed across chunks in fp16 instead of fp32.
    monkeypatch.setattr(lce_mod, "_FP32_DW_LIMIT", 0)
    monkeypatch.setattr(lce_mod, "_CHUNK_ROWS", 4)
    gen = torch.Generator().manual_seed(11)
    x, w = torch.randn(11, 24, generator=gen), torch.randn(37, 24, generator=gen) * 0.3
    target = torch.randint(0, 37, (11,), generator=gen)
    target[[0, 5]] = -100
    check_op(
        lambda a, c, t: ops.linear_cross_entropy(a, c, t).to(a.dtype),
        lambda a, c, t: F.cross_entropy(a @ c.T, t),
        lambda a, c, t: F.cross_entropy(a @ c.T, t),
        [x, w, target],
        torch.float16,
        "linear_cross_entropy (fp16 dW accumulation)",
        grad_mask=[True, True, False],
        norm=True,
    )


@settings(max_examples=examples(10))
@given(
    rows=st.integers(1, 3),
    n=st.integers(65, 700),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_split_rows_hypothesis(rows, n, dtype, seed):
    """Drawn few-long-row shapes on the split path (blocks of 64, chunks of at
    least 16): every op that splits rows, forward and backward, against float64."""
    mp = pytest.MonkeyPatch()
    mp.setattr(_dispatch, "_MAX_BLOCK", 64)
    mp.setattr(_dispatch, "_SPLIT_MIN_BLOCK", 16)
    _dispatch.set_backend("triton")
    try:
        assert _dispatch.row_split(rows, n, torch.device("cpu"))[0] > 1
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, n, generator=gen) * 2 + 1
        r, w, b = (
            torch.randn(rows, n, generator=gen),
            torch.randn(n, generator=gen),
            torch.randn(n, generator=gen),
        )
        check_op(
            ops.rms_norm,
            lambda a, c: F.rms_norm(a, (n,), c, 1e-6),
            _rms_norm_ref,
            [x, w],
            dtype,
            "rms_norm (split)",
            seed=seed,
            terms=rms_terms(1e-6),
        )
        check_op(
            ops.layer_norm,
            lambda a, c, d: F.layer_norm(a, (n,), c, d),
            _layer_norm_ref,
            [x, w, b],
            dtype,
            "layer_norm (split)",
            seed=seed,
            terms=ln_terms(1e-5),
        )
        check_op(
            lambda a: ops.log_softmax(a, -1),
            lambda a: torch.log_softmax(a, -1),
            lambda a: _log_softmax_ref(a, -1),
            [x],
            dtype,
            "log_softmax (split)",
            seed=seed,
        )
        check_op(
            lambda a, c, d: ops.add_rms_norm(a, c, d, 1e-6),
            lambda a, c, d: (F.rms_norm(a + c, (n,), d, 1e-6), a + c),
            add_rms_ref(dtype),
            [x, r, w],
            dtype,
            "add_rms_norm (split)",
            seed=seed,
            terms=add_rms_terms(dtype),
        )
        t = torch.randint(0, n, (rows,), generator=gen)
        check_op(
            lambda a, q: ops.cross_entropy(a, q, label_smoothing=0.05, reduction="sum"),
            lambda a, q: F.cross_entropy(a, q, label_smoothing=0.05, reduction="sum"),
            lambda a, q: F.cross_entropy(a, q, label_smoothing=0.05, reduction="sum"),
            [x, t],
            dtype,
            "cross_entropy (split)",
            grad_mask=[True, False],
            seed=seed,
        )
    finally:
        _dispatch.set_backend("auto")
        mp.undo()
