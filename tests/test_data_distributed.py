"""fastml.data sharding across 2 real processes under torch.distributed (gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("torch.distributed")

_WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch.distributed as dist
    from fastml import data

    port, rank, world, out, parquet = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if parquet == "-":
            ds = data.Dataset.from_numpy({"i": np.arange(1001, dtype=np.int64)})
        else:
            ds = data.Dataset.from_parquet(parquet)
        loader = data.Loader(ds, batch_size=64, seed=7, shuffle_buffer=300)  # rank/world from dist
        assert loader.state_dict()["rank"] == rank and loader.state_dict()["world_size"] == world
        batches = [b["i"].copy() for b in loader]
        counts = [None] * world
        dist.all_gather_object(counts, len(batches))
        np.save(out, np.concatenate(batches))
        print("batches", len(batches), "all", counts, "len", len(loader))
    finally:
        dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("source", ["numpy", "parquet"])
def test_two_processes_get_disjoint_equal_shards(tmp_path, source):
    n = 1001
    parquet = "-"
    if source == "parquet":
        parquet = str(tmp_path / "d.parquet")
        pq.write_table(pa.table({"i": np.arange(n, dtype=np.int64)}), parquet, row_group_size=150)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "GLOO_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER,
                str(port),
                str(r),
                "2",
                str(tmp_path / f"r{r}.npy"),
                parquet,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
        assert p.returncode == 0, out
    # Each process saw both ranks' batch counts through all_gather: equal.
    for out in outs:
        assert "all [8, 8]" in out and "len 8" in out, out
    r0, r1 = (np.load(tmp_path / f"r{r}.npy") for r in range(2))
    assert len(r0) == len(r1) == 501
    # 1001 rows over 2 ranks: one row is repeated as padding (documented); otherwise disjoint.
    assert len(np.intersect1d(r0, r1)) <= 1
    assert set(np.concatenate([r0, r1]).tolist()) == set(range(n))
