"""fastml.data with device="cuda": pinned staging, async copies, events (needs a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from fastml import data

pytestmark = pytest.mark.gpu


def _dataset(n: int = 5000) -> tuple[data.Dataset, np.ndarray]:
    x = np.random.default_rng(0).random((n, 32), np.float32)
    return data.Dataset.from_numpy({"i": np.arange(n), "x": x}), x


def test_cuda_batches_match_cpu_batches():
    torch = pytest.importorskip("torch")
    ds, _x = _dataset()
    cpu = [b for b in data.Loader(ds, batch_size=300, seed=4)]
    gpu_loader = data.Loader(ds, batch_size=300, seed=4, device="cuda")
    kept = []
    for c, g in zip(cpu, gpu_loader, strict=True):
        assert g["x"].is_cuda and g["x"].dtype == torch.float32
        torch.testing.assert_close(g["x"].cpu(), torch.from_numpy(c["x"]), rtol=0, atol=0)
        assert torch.equal(g["i"].cpu(), torch.from_numpy(c["i"]))
        kept.append((g, c["x"].copy()))
    torch.cuda.synchronize()
    for g, c in kept:  # staging buffers were recycled; device batches never change
        assert np.array_equal(g["x"].cpu().numpy(), c)
    s = gpu_loader.stats()
    assert s["h2d_copies"] == len(cpu) and s["h2d_bytes"] == 5000 * (32 * 4 + 8)
    assert s["h2d_transfers"] == len(cpu)  # one host-to-device copy per batch
    gpu_loader.close()


def test_cuda_many_columns_one_copy_per_batch():
    """33 columns of mixed dtypes and shapes (the shape of `fastml bench`'s
    data set, which took 33 copies per batch): one copy per batch, every
    column a view of one device buffer, equal to the CPU loader's batch."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    n = 10_007
    cols = {f"f{j}": rng.random(n, np.float32) for j in range(30)}
    cols |= {"y": rng.integers(0, 2, n), "m": rng.random(n) < 0.5, "e": rng.random((n, 4))}
    ds = data.Dataset.from_numpy(cols)
    cpu = list(data.Loader(ds, batch_size=1024, seed=2))
    loader = data.Loader(ds, batch_size=1024, seed=2, device="cuda")
    got = list(loader)
    assert len(got) == len(cpu)
    for g, c in zip(got, cpu, strict=True):
        for k, v in c.items():
            assert g[k].is_cuda and tuple(g[k].shape) == v.shape
            assert g[k].cpu().numpy().tobytes() == v.tobytes(), k
    s = loader.stats()
    assert s["h2d_transfers"] == s["h2d_copies"] == len(cpu)
    assert s["h2d_bytes"] == s["bytes"] <= s["h2d_copied_bytes"]
    loader.close()


def test_cuda_copies_are_ordered_with_the_current_stream():
    torch = pytest.importorskip("torch")
    ds, x = _dataset(20000)
    side = torch.cuda.Stream()
    loader = data.Loader(ds, batch_size=4096, shuffle=False, device="cuda")
    with torch.cuda.stream(side):
        sums = [b["x"].sum(dim=0) for b in loader]  # consumed on the side stream, no sync
    torch.cuda.synchronize()
    ref = [x[k : k + 4096].sum(axis=0) for k in range(0, 20000, 4096)]
    for s, r in zip(sums, ref, strict=True):
        np.testing.assert_allclose(s.cpu().numpy(), r, rtol=1e-4)
    loader.close()


def test_cuda_parquet_and_transforms(tmp_path):
    torch = pytest.importorskip("torch")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"i": np.arange(3000), "v": np.arange(3000, dtype=np.float64)}),
        tmp_path / "d.parquet",
        row_group_size=500,
    )
    ds = data.Dataset.from_parquet(tmp_path / "d.parquet")
    loader = data.Loader(
        ds,
        batch_size=256,
        device="cuda",
        transforms={"v": [data.Standardize(1500.0, 10.0), data.Cast("float16")]},
    )
    seen = []
    for b in loader:
        ref = ((b["i"].cpu().numpy() - 1500.0) / 10.0).astype(np.float16)
        assert b["v"].dtype == torch.float16
        np.testing.assert_array_equal(b["v"].cpu().numpy(), ref)
        seen.append(b["i"].cpu().numpy())
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(3000))
    # Decoded pages are gathered straight into the pinned pool buffers (the
    # Parquet batcher draws from the stager's pool): every byte handed out
    # crossed to the device once, with no pageable staging copy.
    s = loader.stats()
    assert s["h2d_bytes"] == s["bytes"] > 0
    loader.close()


def test_device_resident_dataset_matches_host_batches():
    """Dataset.to("cuda"): gathers and transforms on the GPU, bit for bit the
    host loader's batches, for every rank of a sharded epoch."""
    torch = pytest.importorskip("torch")
    ds, _x = _dataset(7001)
    tf = {"x": [data.FillNa(0.0), data.Standardize(0.5, 0.25), data.Cast("float16")]}
    dd = ds.to("cuda")
    assert dd.device.startswith("cuda")
    for rank in range(2):
        kw = dict(batch_size=512, seed=3, transforms=tf, rank=rank, world_size=2)
        host = list(data.Loader(ds, **kw))
        dev = list(data.Loader(dd, **kw))
        assert len(host) == len(dev)
        for h, g in zip(host, dev, strict=True):
            assert g["x"].is_cuda and g["x"].dtype == torch.float16
            assert g["x"].cpu().numpy().tobytes() == h["x"].tobytes()
            assert np.array_equal(g["i"].cpu().numpy(), h["i"])
