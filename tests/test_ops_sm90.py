"""fastml.ops kernels compiled for an H100/H200 (sm_90a), without a GPU.

Triton builds PTX and SASS for sm_90a on any machine, so the kernels every op
launches can be checked statically: no register spills, and 16-byte global
accesses on their main paths. `benchmarks/gpu/inspect_kernels.py` compiles each
launch with the specialisation a real launch gets (in a subprocess: it replaces
Triton's driver). This would have caught AdamW's scalar 4-byte accesses and the
first split-row kernels' 8-byte ones (docs/development.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "gpu" / "inspect_kernels.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sm90") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--shapes",
            "4096x4096,2048x16384,64x131072",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_op_launches_compiled_kernels(report):
    ops = {r["op"] for r in report}
    assert ops == {"rms", "addrms", "ln", "softmax", "logsoftmax", "swiglu", "ce", "adamw"}
    assert all(r["registers"] for r in report)


# Kernels allowed to spill, with the bound and the reason.
# layer_norm's backward for rows of two blocks (8,192 < N <= 16,384) keeps four
# dW/dB accumulators of 16 floats per thread across its rows (128 registers at 512
# threads): 64 bytes per thread spill to L1-cached local memory, where the general
# path read and wrote dW and dB partial rows in global memory for every row
# (256 KB per row of 16,384 columns). Not measured on a GPU yet.
SPILL_ALLOWED = {"_layer_norm_bwd_kernel": 64}


def test_no_kernel_spills_registers(report):
    spilling = [(r["op"], r["shape"], r["kernel"], r["spill_bytes"]) for r in report]
    assert [s for s in spilling if s[3] > SPILL_ALLOWED.get(s[2], 0)] == []


# Kernels that stream no row: one program per row combining a few partials
# (16 per row at 64 x 131,072) and reading one logit.
NOT_STREAMING = {"_ce_split_loss_kernel"}


def test_main_paths_use_16_byte_accesses(report):
    # Every kernel that streams a row or a tensor loads it with 16-byte vectors
    # (bf16 at these shapes; the tails and scalars are narrower by design).
    narrow = [
        (r["op"], r["shape"], r["kernel"], r["access"])
        for r in report
        if r["kernel"] not in NOT_STREAMING and not any(k.startswith("ldv4") for k in r["access"])
    ]
    assert narrow == []
