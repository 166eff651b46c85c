"""fastml.ops: AdamW, the nn.Modules, dispatch, argument errors, custom ops and torch.compile."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from _hyp import examples
from _ops_util import assert_rule
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastml import ops
from fastml.ops import _dispatch

rms_mod = importlib.import_module("fastml.ops.rms_norm")


@pytest.fixture
def triton_backend():
    _dispatch.set_backend("triton")
    yield
    _dispatch.set_backend("auto")


# ---------------------------------------------------------------- AdamW

SHAPES = [(1,), (1, 1), (3, 5), (1031,), (2, 3, 7)]


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]


def _run(opt_cls, params, steps=10, seed=1, **kw):
    opt = opt_cls(params, **kw)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_adamw_matches_torch(triton_backend, amsgrad, weight_decay, maximize):
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=weight_decay, amsgrad=amsgrad)
    kw["maximize"] = maximize
    ours, theirs = _params(), _params()
    opt = _run(ops.AdamW, ours, **kw)
    _run(torch.optim.AdamW, theirs, **kw)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)
    for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
        assert all(key in opt.state[p] for p in ours)
    assert float(opt.state[ours[0]]["step"]) == 10.0


def test_adamw_fp16_params_rule(triton_backend):
    # fp16 params: fastml updates in fp32 and rounds once; torch rounds every op.
    # Both round params and moments to fp16 after every step, so after 10 steps an
    # element's error is the sum of ten roundings along its own path: the rule is
    # applied to each tensor's largest error (norm=True).
    ours, theirs = _params(torch.float16), _params(torch.float16)
    ref = [p.detach().double().requires_grad_() for p in ours]
    kw = dict(lr=1e-2, weight_decay=0.05)
    _run(ops.AdamW, ours, **kw)
    _run(torch.optim.AdamW, theirs, **kw)
    _run(torch.optim.AdamW, ref, **kw)
    for a, b, r in zip(ours, theirs, ref, strict=True):
        assert_rule(a.detach(), b.detach(), r.detach(), "AdamW fp16 params", norm=True)


def test_adamw_state_dict_and_layouts(triton_backend):
    # A transposed (non-contiguous) parameter takes the single-tensor path; a param
    # without grad is skipped; state_dicts move between fastml and torch.
    base = torch.randn(5, 3)
    ours = [torch.nn.Parameter(base.t().clone().t().t()), torch.nn.Parameter(torch.randn(4))]
    ours.append(torch.nn.Parameter(torch.randn(2)))
    assert not ours[0].is_contiguous()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a, b = ops.AdamW(ours, lr=0.1), torch.optim.AdamW(theirs, lr=0.1)
    for _ in range(3):
        for p, q in zip(ours[:2], theirs[:2], strict=True):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
    assert ours[2] not in a.state
    c = torch.optim.AdamW(copy.deepcopy(theirs), lr=0.1)
    c.load_state_dict(a.state_dict())
    d = ops.AdamW(copy.deepcopy(ours), lr=0.1)
    d.load_state_dict(b.state_dict())
    assert float(d.state_dict()["state"][0]["step"]) == 3.0


def test_adamw_closure_and_cpu_default():
    # Default backend on CPU: exactly torch.optim.AdamW.step; the closure is honoured.
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    q = torch.nn.Parameter(p.detach().clone())
    a, b = ops.AdamW([p], lr=0.1), torch.optim.AdamW([q], lr=0.1)

    def closure(t, opt):
        def f():
            opt.zero_grad()
            loss = (t**2).sum()
            loss.backward()
            return loss

        return f

    for _ in range(3):
        assert a.step(closure(p, a)) == b.step(closure(q, b))
    assert torch.equal(p, q)


def test_adamw_rejects_unsupported():
    p = [torch.nn.Parameter(torch.randn(2))]
    with pytest.raises(ValueError, match="differentiable"):
        ops.AdamW(p, differentiable=True)
    with pytest.raises(ValueError, match="fused"):
        ops.AdamW(p, fused=True)
    with pytest.raises(ValueError, match="learning rate"):
        ops.AdamW(p, lr=-1.0)
    for bad in (-1, 2**31, 1.5, True, "7"):
        with pytest.raises(ValueError, match="seed"):
            ops.AdamW(p, stochastic_rounding=True, seed=bad)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        ops.AdamW(p, stochastic_rounding=1)


def _grads(params, gen, skip=None, step=0):
    out = []
    for i, p in enumerate(params):
        if skip is not None and i == skip and step % 2:
            out.append(None)
        else:
            out.append(torch.randn(p.shape, generator=gen).to(p.dtype))
    return out


def _step_both(a, b, ours, theirs, grads):
    for p, q, g in zip(ours, theirs, grads, strict=True):
        p.grad = None if g is None else g.clone()
        q.grad = None if g is None else g.clone()
    a.step()
    b.step()


def test_adamw_tensor_lr_and_betas_read_by_the_kernel(triton_backend, monkeypatch):
    """lr and betas as tensors on the parameters' device are read by the kernel
    at each launch (a scheduler writes lr in place: no host read, no recompile);
    the result follows torch with the same schedule."""
    adamw_mod = importlib.import_module("fastml.ops.adamw")
    seen = []
    real = adamw_mod._scalar_arg

    def spy(value, device):
        out = real(value, device)
        seen.append(out[1])
        return out

    monkeypatch.setattr(adamw_mod, "_scalar_arg", spy)
    gen = torch.Generator().manual_seed(5)
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in [(7,), (3, 5), (1,)]]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    lr = torch.tensor(0.05)
    a = ops.AdamW(ours, lr=lr, betas=(torch.tensor(0.8), torch.tensor(0.95)), weight_decay=0.1)
    b = torch.optim.AdamW(theirs, lr=0.05, betas=(0.8, 0.95), weight_decay=0.1)
    sa = torch.optim.lr_scheduler.StepLR(a, step_size=2, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(b, step_size=2, gamma=0.5)
    for _ in range(7):
        _step_both(a, b, ours, theirs, _grads(ours, gen))
        sa.step()
        sb.step()
    assert a.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.05 * 0.5**3)
    assert seen and all(seen), "lr and betas should reach the kernel as tensors"
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_adamw_capturable_keeps_the_step_on_the_device(triton_backend, monkeypatch, amsgrad):
    """capturable=True: step counters live with the parameters, the kernel reads
    them and computes the bias corrections (in float64), and the host never reads
    a tensor during the step (what a CUDA graph capture needs). Parameters whose
    gradient is missing on some steps keep their own counts."""
    gen = torch.Generator().manual_seed(8)
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in [(5,), (7, 3), (1,), (40,)]]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    kw = dict(lr=0.05, betas=(0.85, 0.97), weight_decay=0.05, amsgrad=amsgrad)
    a = ops.AdamW(ours, capturable=True, **kw)
    b = torch.optim.AdamW(theirs, **kw)
    _step_both(a, b, ours, theirs, _grads(ours, gen))  # warm-up: state and tables exist

    def no_host_read(*args, **kwargs):
        raise AssertionError("the capturable step read a tensor on the host")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__float__", "__bool__"):
            m.setattr(torch.Tensor, name, no_host_read)
        for step in range(1, 8):
            grads = _grads(ours, gen, skip=1, step=step)
            for p, q, g in zip(ours, theirs, grads, strict=True):
                p.grad = None if g is None else g.clone()
                q.grad = None if g is None else g.clone()
            a.step()
            m.undo()
            b.step()
            for name in ("item", "tolist", "__float__", "__bool__"):
                m.setattr(torch.Tensor, name, no_host_read)
    assert all(a.state[p]["step"].device == p.device for p in ours)
    assert float(a.state[ours[1]]["step"]) == 4.0 and float(a.state[ours[0]]["step"]) == 8.0
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
    # The state moves between capturable fastml and torch.
    c = torch.optim.AdamW(copy.deepcopy(theirs), **kw)
    c.load_state_dict(a.state_dict())
    d = ops.AdamW(copy.deepcopy(ours), capturable=True, **kw)
    d.load_state_dict(b.state_dict())
    assert float(d.state_dict()["state"][1]["step"]) == 4.0


def _sr_run(backend, steps, seed=11, n=1 << 16, lr=1e-3, rounding=True):
    """bf16 parameters at 1.0 with a constant gradient: each fp32 update (~lr) is
    below half a bf16 ulp (2**-9 under 1.0), so round-to-nearest loses it."""
    _dispatch.set_backend(backend)
    try:
        p = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
        opt = ops.AdamW([p], lr=lr, weight_decay=0.0, stochastic_rounding=rounding, seed=seed)
        for _ in range(steps):
            p.grad = torch.ones(n, dtype=torch.bfloat16)
            opt.step()
    finally:
        _dispatch.set_backend("auto")
    return p.detach(), opt


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_adamw_stochastic_rounding_is_unbiased(backend):
    """The mean of stochastically rounded parameters equals the float32 update
    within sampling error; round-to-nearest leaves them at 1.0. Seeded:
    the same seed repeats bit for bit, another seed differs."""
    steps, lr = 6, 1e-3
    rtn, _ = _sr_run(backend, steps, rounding=False)
    if backend == "torch" or not _dispatch._interpreting():  # the interpreter truncates bf16
        assert torch.equal(rtn, torch.ones_like(rtn))
    sr, opt = _sr_run(backend, steps)
    # fp32 reference: with a constant gradient every step moves by lr / (1 + eps').
    ref = torch.ones(1, requires_grad=True)
    ref_opt = torch.optim.AdamW([ref], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        ref.grad = torch.ones(1)
        ref_opt.step()
    expected = float(ref.detach())
    values = sr.float()
    # Each element sits on one of two bf16 neighbours of its own fp32 path; the
    # per-step rounding noise is at most one ulp (2**-8 here) with variance
    # <= ulp**2 / 4 per step, so the mean's standard error is bounded by:
    sigma = (2.0**-8) * (steps / 4 / values.numel()) ** 0.5
    assert abs(values.mean().item() - expected) < 6 * sigma, (values.mean().item(), expected)
    assert values.min() >= expected - steps * 2.0**-8 and values.max() <= 1.0
    again, _ = _sr_run(backend, steps)
    assert torch.equal(again, sr)
    other, _ = _sr_run(backend, steps, seed=12)
    assert not torch.equal(other, sr)
    groups = opt.state_dict()["param_groups"]
    assert groups[0]["stochastic_rounding"] is True and groups[0]["seed"] == 11


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_adamw_float32_state_for_half_params(backend):
    """state_dtype=float32 keeps the moments in float32 for fp16 parameters: with
    gradients of 1e-3 an fp16 second moment (~1e-9) underflows and the update
    blows up, where float32 moments follow the float64 run; the
    state dtype survives state_dict round trips (torch would cast to fp16)."""
    gen = torch.Generator().manual_seed(4)
    start = torch.randn(257, generator=gen)
    grads = [torch.randn(257, generator=gen) * 1e-3 for _ in range(6)]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, amsgrad=True)

    def run(dtype, **extra):
        p = start.to(dtype).requires_grad_()
        _dispatch.set_backend(backend)
        try:
            opt = (torch.optim.AdamW if dtype == torch.float64 else ops.AdamW)([p], **kw, **extra)
            for g in grads:
                p.grad = g.to(dtype)
                opt.step()
        finally:
            _dispatch.set_backend("auto")
        return p.detach().double(), opt

    ref, _ = run(torch.float64)
    half, _ = run(torch.float16)
    mixed, opt = run(torch.float16, state_dtype=torch.float32)
    st = next(iter(opt.state.values()))
    assert {st[k].dtype for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")} == {torch.float32}
    err_mixed = (mixed - ref).abs().max().item()
    # (torch's own fp16 step even reaches inf/nan here: eps-sized denominators)
    assert err_mixed < 0.25 * (half - ref).abs().nan_to_num(float("inf")).max().item()
    assert err_mixed < 4 * 2.0**-10 * ref.abs().max().item()  # a few fp16 ulps
    again = ops.AdamW([torch.zeros(257, dtype=torch.float16, requires_grad=True)], **kw,
                      state_dtype=torch.float32)  # fmt: skip
    again.load_state_dict(opt.state_dict())
    st2 = next(iter(again.state.values()))
    assert st2["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(st2["exp_avg_sq"], st["exp_avg_sq"])
    with pytest.raises(ValueError, match="state_dtype"):
        ops.AdamW([torch.zeros(2, requires_grad=True)], state_dtype=torch.int32)


def test_adamw_stochastic_rounding_leaves_other_dtypes_and_defaults_seed(triton_backend):
    gen = torch.Generator().manual_seed(2)
    plain = [torch.randn(33, generator=gen).requires_grad_()]
    rounded = [plain[0].detach().clone().requires_grad_()]
    a = ops.AdamW(plain, lr=0.05)
    b = ops.AdamW(rounded, lr=0.05, stochastic_rounding=True)
    for _ in range(3):
        _step_both(a, b, plain, rounded, _grads(plain, gen))
    assert torch.equal(plain[0], rounded[0])  # float32 parameters are not rounded
    torch.manual_seed(123)
    s1 = ops.AdamW(plain, stochastic_rounding=True).param_groups[0]["seed"]
    torch.manual_seed(123)
    s2 = ops.AdamW(plain, stochastic_rounding=True).param_groups[0]["seed"]
    assert s1 == s2 and 0 <= s1 < 2**31


# ---------------------------------------------------------------- modules


def test_rmsnorm_module_is_a_drop_in():
    torch.manual_seed(0)
    ref = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
    ours = ops.RMSNorm(16)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(ours(x), ref(x))
    two_d = ops.RMSNorm((3, 16), elementwise_affine=False)
    torch.testing.assert_close(two_d(x), F.rms_norm(x, (3, 16), None, 1e-6))
    assert "eps=1e-06" in repr(ours)


def test_layernorm_module_is_a_drop_in():
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm((4, 8))
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = ops.LayerNorm((4, 8))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 8, requires_grad=True)
    torch.testing.assert_close(ours(x), ref(x))
    ours(x).sum().backward()
    g = x.grad.clone()
    x.grad = None
    ref(x).sum().backward()
    torch.testing.assert_close(g, x.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    nobias = ops.LayerNorm(8, bias=False)
    assert nobias.bias is None
    torch.testing.assert_close(nobias(x), F.layer_norm(x, (8,), nobias.weight))
    with pytest.raises(ValueError, match="trailing dimensions"):
        ours(torch.randn(3, 8))


def test_swiglu_module():
    torch.manual_seed(0)
    m = ops.SwiGLU(8, 20)
    x = torch.randn(2, 5, 8)
    want = m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
    torch.testing.assert_close(m(x), want)
    assert ops.SwiGLU(8, 20, out_features=3)(x).shape == (2, 5, 3)


# ---------------------------------------------------------------- dispatch and errors


def test_backend_selection(monkeypatch):
    assert ops.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("cuda")
    calls = []
    real = rms_mod.launch_row_tiles  # what the Triton forward launches with

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(rms_mod, "launch_row_tiles", spy)
    x, w = torch.randn(3, 8), torch.randn(8)
    want = F.rms_norm(x, (8,), w, 1e-6)
    torch.testing.assert_close(ops.rms_norm(x, w), want)  # auto + CPU: torch
    assert calls == []
    try:
        ops.set_backend("triton")
        torch.testing.assert_close(ops.rms_norm(x, w), want)
        assert calls == [1]
        torch.testing.assert_close(ops.rms_norm(x.double(), w.double()), want.double())
        assert calls == [1]  # float64 stays on torch
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            ops.rms_norm(x, w)
        monkeypatch.setattr(_dispatch, "HAS_TRITON", False)
        with pytest.raises(RuntimeError, match="pip install triton"):
            ops.rms_norm(x, w)
    finally:
        ops.set_backend("auto")
    ops.set_backend("torch")
    try:
        torch.testing.assert_close(ops.rms_norm(x, w), want)
    finally:
        ops.set_backend("auto")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropies_keep_float64(reduction):
    """float64 inputs run in float64 throughout: the losses (and gradients) match
    torch's float64 ones to float64 rounding, not float32's (they were ~3e-8 off)."""
    torch.manual_seed(0)
    x = (torch.randn(64, 1000, dtype=torch.float64) * 5).requires_grad_()
    t = torch.randint(0, 1000, (64,))
    t[3] = -100
    got, want = (
        ops.cross_entropy(x, t, reduction=reduction),
        F.cross_entropy(x, t, reduction=reduction),
    )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad(got.sum(), x)
    (wx,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(gx, wx, rtol=1e-12, atol=1e-14)
    h = torch.randn(64, 16, dtype=torch.float64)
    w = torch.randn(1000, 16, dtype=torch.float64)
    got = ops.linear_cross_entropy(h, w, t, reduction=reduction)
    assert got.dtype == torch.float64
    torch.testing.assert_close(
        got, F.cross_entropy(h @ w.T, t, reduction=reduction), rtol=1e-12, atol=1e-12
    )


def test_launch_tuning_picks_the_fastest_and_caches_it(monkeypatch):
    """The tuner times every candidate once per shape class on CUDA (a fake
    timer here), keeps the fastest, and falls back to the default (first)
    candidate off CUDA, while capturing a graph, under deterministic algorithms,
    when turned off, or when a test forces a configuration."""
    cuda = torch.device("cuda", 0)
    cost = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed: list[str] = []

    def fake_time(launch, config, reps=5):
        timed.append(config)
        return cost[config]

    monkeypatch.setattr(_dispatch, "_time_config", fake_time)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_dispatch, "_TUNED", {})
    monkeypatch.setattr(_dispatch, "_autotune", True)
    cands = ["a", "b", "c"]
    assert _dispatch.launch_config("k", torch.device("cpu"), (1,), cands, None) == "a"
    assert _dispatch.launch_config("k", cuda, (1,), cands, None) == "b"
    assert timed == ["a", "b", "c"]
    assert _dispatch.launch_config("k", cuda, (1,), cands, None) == "b"  # cached
    assert timed == ["a", "b", "c"]
    assert ops.tuned_configs() == {("k", "cuda:0", 1): "b"}
    assert _dispatch.launch_config("k", cuda, (2,), ["c", "a"], None) == "c"  # new class
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert _dispatch.launch_config("k", cuda, (3,), cands, None) == "a"
    torch.use_deterministic_algorithms(True)
    try:
        assert _dispatch.launch_config("k", cuda, (4,), cands, None) == "a"
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setitem(_dispatch._FORCED, "k", "c")
    assert _dispatch.launch_config("k", cuda, (1,), cands, None) == "c"
    monkeypatch.delitem(_dispatch._FORCED, "k")

    def out_of_resources(launch, config, reps=5):
        if config == "b":
            raise RuntimeError("out of resource: shared memory")
        return cost[config]

    monkeypatch.setattr(_dispatch, "_time_config", out_of_resources)
    assert _dispatch.launch_config("k", cuda, (5,), cands, None) == "c"  # "b" skipped
    ops.set_autotune(False)
    try:
        assert ops.tuned_configs() == {}
        assert _dispatch.launch_config("k", cuda, (6,), cands, None) == "a"
    finally:
        ops.set_autotune(True)
    with pytest.raises(TypeError, match="enabled"):
        ops.set_autotune(1)


def test_launch_tuning_file_cache(monkeypatch, tmp_path):
    """FASTML_OPS_TUNING_CACHE: a choice is written to the file, a new process
    (an emptied in-process cache) reuses it without timing, a stale entry (no
    longer a candidate) is retuned, and a corrupt file is an error naming it."""
    cuda = torch.device("cuda", 0)
    path = tmp_path / "sub" / "tuning.json"
    timed: list[tuple] = []
    cost = {("a", 1): 2.0, ("b", 2): 1.0, ("c", 3): 3.0}

    def fake_time(launch, config, reps=5):
        timed.append(config)
        return cost[config]

    monkeypatch.setattr(_dispatch, "_time_config", fake_time)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(_dispatch, "_TUNED", {})
    monkeypatch.setattr(_dispatch, "_FILE_CACHE", {})
    monkeypatch.setattr(_dispatch, "_autotune", True)
    monkeypatch.setenv("FASTML_OPS_TUNING_CACHE", str(path))
    cands = [("a", 1), ("b", 2), ("c", 3)]
    assert _dispatch.launch_config("k", cuda, (torch.bfloat16, 4096), cands, None) == ("b", 2)
    saved = json.loads(path.read_text())
    (entry,) = saved.items()
    assert entry[0].startswith("k|Fake GPU|triton ") and entry[1] == ["b", 2]
    # A new process: nothing in memory, the file answers without timing.
    timed.clear()
    monkeypatch.setattr(_dispatch, "_TUNED", {})
    monkeypatch.setattr(_dispatch, "_FILE_CACHE", {})
    assert _dispatch.launch_config("k", cuda, (torch.bfloat16, 4096), cands, None) == ("b", 2)
    assert timed == []
    # A stale entry (the candidates changed): tuned again and rewritten.
    monkeypatch.setattr(_dispatch, "_TUNED", {})
    new = [("a", 1), ("c", 3)]
    assert _dispatch.launch_config("k", cuda, (torch.bfloat16, 4096), new, None) == ("a", 1)
    assert json.loads(path.read_text())[entry[0]] == ["a", 1]
    path.write_text("{not json")
    monkeypatch.setattr(_dispatch, "_TUNED", {})
    monkeypatch.setattr(_dispatch, "_FILE_CACHE", {})
    with pytest.raises(ValueError, match=r"FASTML_OPS_TUNING_CACHE file .*tuning\.json"):
        _dispatch.launch_config("k", cuda, (torch.bfloat16, 4096), cands, None)


def test_tile_candidates():
    c = _dispatch.tile_candidates(4096)
    assert c[0] == (1, 8, 4)  # the heuristic default first
    assert len(set(c)) == len(c)
    assert {r for r, _, _ in c} == {1, 2, 4} and {p for _, _, p in c} == {1, 2, 3, 4}
    assert all(r * 4096 <= 16384 for r, _, _ in c)
    assert max(r for r, _, _ in _dispatch.tile_candidates(64)) == 16
    assert {r for r, _, _ in _dispatch.tile_candidates(16384)} == {1}


def test_torch_backend_matches_reference_in_float64():
    # The CPU fallbacks on float64 against torch's own float64 ops.
    x = torch.randn(4, 33, dtype=torch.float64)
    w, b = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    t = torch.randint(0, 33, (4,))
    torch.testing.assert_close(ops.rms_norm(x, w), F.rms_norm(x, (33,), w, 1e-6))
    torch.testing.assert_close(ops.layer_norm(x, w, b), F.layer_norm(x, (33,), w, b))
    torch.testing.assert_close(ops.log_softmax(x, 0), torch.log_softmax(x, 0))
    torch.testing.assert_close(
        ops.cross_entropy(x, t, label_smoothing=0.2), F.cross_entropy(x, t, label_smoothing=0.2)
    )
    torch.testing.assert_close(ops.geglu(x, x), F.gelu(x) * x)
    torch.testing.assert_close(
        ops.linear_cross_entropy(x, w.reshape(1, 33).expand(5, 33), t.clamp(max=4)),
        F.cross_entropy(x @ w.reshape(1, 33).expand(5, 33).T, t.clamp(max=4)),
    )


def test_argument_errors():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.rms_norm(x, torch.randn(7))
    with pytest.raises(TypeError, match="x must be float32"):
        ops.rms_norm(torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        ops.layer_norm([1.0, 2.0])
    for bad_eps in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="eps must be"):
            ops.layer_norm(x, eps=bad_eps)
        with pytest.raises(ValueError, match="eps must be"):
            ops.rms_norm(x, eps=bad_eps)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ops.layer_norm(x, None, torch.randn(9))
    with pytest.raises(ValueError, match="residual must match"):
        ops.add_rms_norm(x, torch.randn(3, 7))
    with pytest.raises(IndexError, match="dim must be in"):
        ops.softmax(x, dim=2)
    with pytest.raises(ValueError, match="up must match"):
        ops.swiglu(x, torch.randn(3, 9))
    with pytest.raises(ValueError, match="approximate"):
        ops.geglu(x, x, approximate="erf")
    t = torch.tensor([0, 1, 8])
    with pytest.raises(IndexError, match=r"target must be in \[0, 8\)"):
        ops.cross_entropy(x, t)
    with pytest.raises(TypeError, match="target must hold integer"):
        ops.cross_entropy(x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"target must have shape \(3,\)"):
        ops.cross_entropy(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.cross_entropy(x, t.clamp(max=7), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.cross_entropy(x, t.clamp(max=7), label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 8\)"):
        ops.linear_cross_entropy(x, torch.randn(5, 7), t.clamp(max=4))
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        ops.linear_cross_entropy(x, torch.randn(5, 8).half(), t.clamp(max=4))
    with pytest.raises(IndexError, match=r"target must be in \[0, 5\)"):
        ops.linear_cross_entropy(x, torch.randn(5, 8), torch.tensor([0, 5, -100]))
    with pytest.raises(ValueError, match="bias must be"):
        ops.linear_cross_entropy(x, torch.randn(5, 8), t.clamp(max=4), bias=torch.randn(4))


def test_empty_inputs(triton_backend):
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y = ops.rms_norm(x, w)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(16))
    assert ops.softmax(torch.randn(2, 0)).shape == (2, 0)
    assert ops.swiglu(torch.randn(0), torch.randn(0)).shape == (0,)


# ---------------------------------------------------------------- custom ops and compile


def _opcheck_cases():
    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    t = torch.tensor([1, -100, 7])
    return [
        (torch.ops.fastml.rms_norm_fwd.default, (x, w, None, 1e-6)),
        (torch.ops.fastml.rms_norm_fwd.default, (x, w, x.clone(), 1e-6)),
        (torch.ops.fastml.layer_norm_fwd.default, (x, w, b, 1e-5)),
        (torch.ops.fastml.softmax_fwd.default, (x, True)),
        (torch.ops.fastml.cross_entropy_fwd.default, (x, t, -100, 0.1)),
        (torch.ops.fastml.glu_fwd.default, (x, b.expand(3, 8).contiguous(), "gelu")),
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_ops_pass_opcheck(backend):
    ops.set_backend(backend)
    try:
        for op, args in _opcheck_cases():
            args = tuple(
                a.clone().requires_grad_()
                if isinstance(a, torch.Tensor) and a.is_floating_point()
                else a
                for a in args
            )
            torch.library.opcheck(op, args)
    finally:
        ops.set_backend("auto")


def test_torch_compile_fullgraph_cpu():
    # CPU + torch backend; aot_eager traces through the custom ops' fake
    # implementations and autograd formulas (Inductor + CUDA is a gpu test).
    torch._dynamo.reset()
    torch.manual_seed(0)
    norm, mlp = ops.RMSNorm(16), ops.SwiGLU(16, 24)
    ln = ops.LayerNorm(16)
    head = torch.randn(11, 16, requires_grad=True)

    def step(x, r, t):
        y, s = ops.add_rms_norm(x, r, norm.weight)
        h = ln(mlp(y) + s)
        loss = ops.linear_cross_entropy(h, head, t) + ops.cross_entropy(h[:, :11], t)
        col_major = h.t().contiguous().t()  # same values, transposed layout
        extra = ops.rms_norm(col_major, None).square().mean() + ops.softmax(h, 0)[0].sum()
        return loss + extra + ops.geglu(h, h).mean()

    x, r = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16)
    t = torch.tensor([1, 2, -100, 4, 5, 10])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x, r, t)
    (gx,) = torch.autograd.grad(got, x)
    want = step(x, r, t)
    (wx,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)


@pytest.mark.parametrize("split", [False, True], ids=["row_programs", "split_rows"])
def test_cross_entropy_kernel_flags_out_of_range_targets(triton_backend, monkeypatch, split):
    """The forward kernel never reads through a target outside [0, C): such a
    row counts as ignored (loss 0, zero gradient) and its validity is -2**30,
    so the validity sum (the mean's denominator) goes negative and one
    asynchronous assert reports it on CUDA; on CPU the host check raises first."""
    ce = importlib.import_module("fastml.ops.cross_entropy")
    if split:  # 5 rows of 8 split into chunks of 2 (the CPU stand-in has 4 "SMs": 5 > 4)
        monkeypatch.setattr(_dispatch, "_MAX_BLOCK", 2)
        monkeypatch.setattr(_dispatch, "_SPLIT_MIN_BLOCK", 2)
        monkeypatch.setattr(_dispatch, "_sms", lambda device: 8)
        assert _dispatch.row_split(5, 8, torch.device("cpu"))[0] == 4
    x = torch.randn(5, 8)
    t = torch.tensor([0, 8, -100, -3, 7])
    loss, lse, valid = ce.cross_entropy_forward(x, t, -100, 0.0)
    assert valid.tolist() == [1, -(2**30), 0, -(2**30), 1]
    assert loss[1] == loss[2] == loss[3] == 0.0
    ref = F.cross_entropy(x[[0, 4]], t[[0, 4]], reduction="none")
    torch.testing.assert_close(loss[[0, 4]], ref)
    assert int(valid.sum()) < 0
    dx = ce.cross_entropy_backward(torch.ones(5), x, t, lse, -100, 0.0)
    assert dx[1].abs().sum() == dx[2].abs().sum() == dx[3].abs().sum() == 0
    with pytest.raises(IndexError, match=r"target must be in \[0, 8\)"):
        ops.cross_entropy(x, t)
    # Compiled (the device path on any device): the async assert names the range.
    torch._dynamo.reset()
    f = torch.compile(ops.cross_entropy, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"target must be in \[0, 8\)"):
        f(x, t)
    torch.testing.assert_close(f(x, t.clamp(0, 7)), F.cross_entropy(x, t.clamp(0, 7)))


def test_compiled_graph_calls_the_custom_ops():
    # Under torch.compile the functionals must emit the registered ops (opaque,
    # with fake implementations), not trace into the eager autograd.Function.
    torch._dynamo.reset()
    seen: set[str] = set()

    def record(gm, _example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def f(x, w, t):
        y = ops.layer_norm(ops.rms_norm(x, w), w) + ops.log_softmax(x)
        return ops.cross_entropy(ops.swiglu(y, x), t) + ops.linear_cross_entropy(y, w[None], t * 0)

    x, w, t = torch.randn(4, 8), torch.randn(8), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(
        torch.compile(f, fullgraph=True, backend=record)(x, w, t), f(x, w, t)
    )
    for name in ("rms_norm_fwd", "layer_norm_fwd", "softmax_fwd", "glu_fwd", "cross_entropy_fwd"):
        assert f"fastml.{name}" in " ".join(seen), (name, seen)
    assert "fastml.linear_cross_entropy_fwd" in " ".join(seen)


def test_add_rms_norm_partial_use():
    # Only one of the two outputs feeding the loss: the other's gradient is absent.
    x, r = (torch.randn(3, 16, requires_grad=True) for _ in range(2))
    w = torch.randn(16, requires_grad=True)
    y, s = ops.add_rms_norm(x, r, w)
    s.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 16)) and torch.equal(r.grad, torch.ones(3, 16))
    assert w.grad is None or torch.equal(w.grad, torch.zeros(16))
    x.grad = r.grad = w.grad = None
    y, s = ops.add_rms_norm(x, r, w)
    (y * 2).sum().backward()
    xs = (x + r).detach().requires_grad_()
    (F.rms_norm(xs, (16,), w.detach(), 1e-6) * 2).sum().backward()
    torch.testing.assert_close(x.grad, xs.grad)
    torch.testing.assert_close(r.grad, xs.grad)


def test_adamw_mixed_dtypes_and_uneven_steps(triton_backend):
    # Two dtype groups (two launches) and parameters whose `step`s differ because
    # some have no gradient on some steps: per-tensor bias corrections.
    gen = torch.Generator().manual_seed(3)
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in [(5,), (7, 3), (1,)]]
    ours += [torch.randn(9, generator=gen).half().requires_grad_()]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    a = ops.AdamW(ours, lr=0.05, weight_decay=0.01, amsgrad=True)
    b = torch.optim.AdamW(theirs, lr=0.05, weight_decay=0.01, amsgrad=True)
    for step in range(6):
        for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
            if i == 1 and step % 2:  # skipped every other step
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert float(a.state[ours[1]]["step"]) == 3.0 and float(a.state[ours[0]]["step"]) == 6.0
    for p, q in zip(ours[:3], theirs[:3], strict=True):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
    # fp16: one rounding per step here, one per op in torch; within a couple of ulps.
    torch.testing.assert_close(ours[3], theirs[3], rtol=2e-3, atol=2e-3)


@given(
    sizes=st.lists(
        st.sampled_from([0, 1, 2, 7, 255, 256, 257, 1023, 1024, 1025, 2048, 3001]),
        min_size=1,
        max_size=40,
    ),
    skip=st.integers(-1, 39),
    small_chunks=st.booleans(),
    misaligned=st.booleans(),
)
@example(sizes=[0, 1024, 0, 1, 1025, 0], skip=-1, small_chunks=False, misaligned=False)
@example(sizes=[1025] * 33, skip=5, small_chunks=False, misaligned=False)  # 6-step search
@example(sizes=[256, 257, 0, 3001], skip=1, small_chunks=True, misaligned=True)
@settings(max_examples=examples(30))
def test_adamw_finds_every_block_tensor(sizes, skip, small_chunks, misaligned):
    """One launch covers every chunk of every tensor: each program finds its
    tensor by a binary search over the tensors' first chunks and walks its chunk
    in full blocks (16-byte accesses when every tensor is aligned) and a masked
    tail. Any mix of sizes (empty, one element, block and chunk edges; chunks of
    256 in blocks of 64 make many chunks per tensor), tensors starting off a
    16-byte boundary, uniform steps or one tensor skipped on a step (per-tensor
    corrections) matches torch."""
    adamw_mod = importlib.import_module("fastml.ops.adamw")
    gen = torch.Generator().manual_seed(len(sizes) * 131 + skip)
    if misaligned:  # contiguous views one element into their storage
        ours = [torch.randn(k + 1, generator=gen)[1:].requires_grad_() for k in sizes]
    else:
        ours = [torch.randn(k, generator=gen).requires_grad_() for k in sizes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    a = ops.AdamW(ours, lr=0.05, weight_decay=0.1)
    b = torch.optim.AdamW(theirs, lr=0.05, weight_decay=0.1)
    old = adamw_mod._BLOCK, adamw_mod._CHUNK
    _dispatch.set_backend("triton")
    if small_chunks:
        adamw_mod._BLOCK, adamw_mod._CHUNK = 64, 256
    try:
        for step in range(3):
            for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
                if i == skip and step == 1:
                    p.grad = q.grad = None
                    continue
                g = torch.randn(p.shape, generator=gen)
                p.grad, q.grad = g.clone(), g.clone()
            a.step()
            b.step()
    finally:
        _dispatch.set_backend("auto")
        adamw_mod._BLOCK, adamw_mod._CHUNK = old
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


def test_import_and_cpu_use_without_triton():
    # A machine without triton: fastml.ops imports, CPU tensors work, and asking for
    # the kernels says how to install triton.
    import os
    import subprocess
    import sys

    code = """
import sys
sys.modules["triton"] = None  # import triton now raises ImportError
import torch
from fastml import ops
x = torch.randn(3, 8)
torch.testing.assert_close(ops.rms_norm(x), torch.nn.functional.rms_norm(x, (8,), None, 1e-6))
ops.set_backend("triton")
try:
    ops.softmax(x)
except RuntimeError as e:
    assert "pip install triton" in str(e), e
    print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_double_backward_raises():
    x = torch.randn(3, 8, requires_grad=True)
    (g,) = torch.autograd.grad(ops.rms_norm(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|does not require grad"):
        g.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_inplace_grad(backend, reduction, dtype):
    """inplace_grad=True: same loss and gradients as the default path (the
    gradient rounded twice in half precision), written into the logits'
    memory; logits from a Linear (non-leaf, 3-D) pass their gradient on."""
    _dispatch.set_backend(backend)
    try:
        torch.manual_seed(3)
        base = (torch.randn(2, 3, 37) * 3).to(dtype)
        t = torch.randint(0, 37, (2, 3))
        t[1, 2] = -100
        kw = {"reduction": reduction, "label_smoothing": 0.1}
        a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
        la = ops.cross_entropy(a, t, **kw)
        lb = ops.cross_entropy(b, t, **kw, inplace_grad=True)
        torch.testing.assert_close(la, lb)
        g = torch.randn_like(la) if reduction == "none" else torch.tensor(1.7, dtype=la.dtype)
        la.backward(g)
        lb.backward(g)
        tol = {} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-2}
        torch.testing.assert_close(b.grad, a.grad, **tol)
        assert not torch.equal(b.detach(), base)  # the logits' memory now holds the gradient
        # Through a Linear: the head's weight gets the default path's gradient.
        torch.manual_seed(4)
        h = torch.randn(2, 3, 8, dtype=dtype)
        heads = [torch.nn.Linear(8, 37, bias=False).to(dtype) for _ in range(2)]
        heads[1].load_state_dict(heads[0].state_dict())
        ops.cross_entropy(heads[0](h), t, **kw).backward(g)
        ops.cross_entropy(heads[1](h), t, **kw, inplace_grad=True).backward(g)
        torch.testing.assert_close(heads[1].weight.grad, heads[0].weight.grad, **tol)
    finally:
        _dispatch.set_backend("auto")


def test_cross_entropy_inplace_grad_guards():
    t = torch.tensor([1, 2, 0])
    z = torch.randn(3, 5, requires_grad=True)
    # exp saves its output: the overwritten logits must not reach its backward.
    loss = ops.cross_entropy(z.exp(), t, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # Logits that need no gradient are left alone.
    x = torch.randn(3, 5)
    before = x.clone()
    ops.cross_entropy(x, t, inplace_grad=True)
    assert torch.equal(x, before)
    with pytest.raises(TypeError, match="inplace_grad must be a bool"):
        ops.cross_entropy(x, t, inplace_grad=1)
    with pytest.raises(IndexError, match=r"target must be in \[0, 5\)"):
        ops.cross_entropy(
            torch.randn(3, 5, requires_grad=True), torch.tensor([0, 5, 1]), inplace_grad=True
        )


# Dynamo itself reads .grad of the non-leaf argument while it builds the graph
# break (a torch-internal UserWarning, not raised by fastml).
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_cross_entropy_inplace_grad_under_compile():
    """Under torch.compile the in-place mode runs eagerly (a graph break)."""
    torch._dynamo.reset()

    def step(x, t):
        return ops.cross_entropy(x * 2.0, t, inplace_grad=True)

    f = torch.compile(step, backend="aot_eager")
    x1 = torch.randn(4, 9, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    t = torch.tensor([0, 3, 8, -100])
    got, want = f(x1, t), ops.cross_entropy(x2 * 2.0, t)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(x1.grad, x2.grad)
