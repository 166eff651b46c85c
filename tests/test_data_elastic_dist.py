"""Elastic resume with real torch.distributed processes (gloo, loopback).

Phase 1: N processes read part of epoch 0 (rank and world size from the
process group), each saving its ``state_dict()`` as a checkpoint would.
Phase 2: M processes load the list of all N states and read the rest of the
epoch; they check with an all-reduce that every rank has the same number of
batches. The parent checks that the rows read in both phases are the epoch's
rows exactly once (in-memory, mapped and Parquet sources), for 2 -> 3 and
3 -> 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")  # not a declared test dependency (see the README)
import torch.distributed as dist  # noqa: E402  (every Linux build of torch has it)

N_ROWS = 2003
BATCH = 32
SOURCES = ("memory", "mapped", "parquet")


def _datasets(root: Path):
    from fastml import data

    out = {
        "memory": data.Dataset.from_numpy({"i": np.arange(N_ROWS, dtype=np.int64)}),
        "mapped": data.Dataset.from_npy({"i": root / "i.npy"}),
    }
    out["parquet"] = data.Dataset.from_parquet(root / "d.parquet")
    return out


def _worker(rank: int, world: int, root: str, phase: int, steps: int) -> None:
    # Runs in a spawned process: one rank of a gloo group on loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    root_p = Path(root)
    dist.init_process_group(
        "gloo", init_method=f"file://{root}/rendezvous{phase}", rank=rank, world_size=world
    )
    try:
        from fastml import data

        out: dict[str, dict] = {}
        for name, ds in _datasets(root_p).items():
            loader = data.Loader(ds, batch_size=BATCH, seed=11, shuffle_buffer=300)
            assert (loader._rank, loader._world_size) == (rank, world)
            if phase == 1:
                it = iter(loader)
                ids = [int(v) for _ in range(steps + rank) for v in next(it)["i"]]
                out[name] = {"ids": ids, "state": loader.state_dict()}
            else:
                states = json.loads((root_p / "states.json").read_text())[name]
                loader.load_state_dict(states)
                n = torch.tensor([len(loader)])
                lo, hi = n.clone(), n.clone()
                dist.all_reduce(lo, op=dist.ReduceOp.MIN)
                dist.all_reduce(hi, op=dist.ReduceOp.MAX)
                batches = [[int(v) for v in b["i"]] for b in loader]
                out[name] = {
                    "ids": [v for b in batches for v in b],
                    "batches": len(batches),
                    "min_len": int(lo),
                    "max_len": int(hi),
                }
            loader.close()
        (root_p / f"phase{phase}_rank{rank}.json").write_text(json.dumps(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(world: int, root: Path, phase: int, steps: int) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, str(root), phase, steps), nprocs=world, join=True)


@pytest.mark.slow
@pytest.mark.parametrize("old,new", [(2, 3), (3, 2)])
def test_elastic_resume_across_process_groups(tmp_path, old, new):
    np.save(tmp_path / "i.npy", np.arange(N_ROWS, dtype=np.int64))
    pq.write_table(
        pa.table({"i": np.arange(N_ROWS, dtype=np.int64)}),
        tmp_path / "d.parquet",
        row_group_size=97,
    )
    sys.path.insert(0, str(Path(__file__).parent))
    _run(old, tmp_path, 1, steps=7)
    first = [json.loads((tmp_path / f"phase1_rank{r}.json").read_text()) for r in range(old)]
    names = list(first[0])
    states = {name: [f[name]["state"] for f in first] for name in names}
    (tmp_path / "states.json").write_text(json.dumps(states))  # the checkpoint
    _run(new, tmp_path, 2, steps=0)
    second = [json.loads((tmp_path / f"phase2_rank{r}.json").read_text()) for r in range(new)]
    for name in names:
        counts = {s[name]["batches"] for s in second}
        assert len(counts) == 1, f"{name}: unequal batch counts {counts}"
        assert {s[name]["min_len"] for s in second} == {s[name]["max_len"] for s in second}
        ids = [v for f in first for v in f[name]["ids"]] + [
            v for s in second for v in s[name]["ids"]
        ]
        assert set(ids) == set(range(N_ROWS)), name
        assert len(ids) - N_ROWS < new, f"{name}: {len(ids) - N_ROWS} repeated rows"
