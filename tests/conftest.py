"""Shared pytest setup: hypothesis profiles, the gpu marker, Triton on CPU."""

from __future__ import annotations

import os

# Triton reads this at import time: without a GPU, its kernels run in the
# interpreter on CPU tensors. It must be set before anything imports triton.
if os.environ.get("FASTML_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis profiles. The default is derandomised: every run of a commit, on any
# machine and under any environment (CI or not), tests the same examples, so the
# README's test command passes or fails the same way every time. Random
# exploration is opt-in (docs/development.md): HYPOTHESIS_PROFILE=explore draws
# new examples on every run (HYPOTHESIS_MAX_EXAMPLES, default 500, per test), and
# what it finds is pinned in the tests with @example.
_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=60, derandomize=True, **_COMMON)
# HYPOTHESIS_DEADLINE_MS (explore only): fail any example that runs longer, e.g.
# 2000 for the untrusted-input campaign's "no hang past 2 s".
_deadline = os.environ.get("HYPOTHESIS_DEADLINE_MS")
settings.register_profile(
    "explore",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "500")),
    derandomize=False,
    **(_COMMON | ({"deadline": int(_deadline)} if _deadline else {})),
)
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
if _PROFILE not in ("default", "explore"):
    raise pytest.UsageError(f"HYPOTHESIS_PROFILE must be 'default' or 'explore', got {_PROFILE!r}")
settings.load_profile(_PROFILE)


def _cuda_device_present() -> bool:
    import fastml

    if fastml.cuda_available():
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_device_present():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
