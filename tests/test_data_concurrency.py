"""One Loader, several threads: the iteration contract (issue #19, point 7).

A Loader hands out each epoch's batches once, to one iteration at a time.
``iter()`` from a second thread while an iteration is live raises; the live
iteration keeps every batch. ``close()``, ``set_epoch()`` and
``load_state_dict()`` from another thread wake a consumer that waits for a
batch, and its next step raises naming the call. Every source kind: in-memory
NumPy, memory-mapped ``.npy``, Arrow, Parquet and a device-resident data set
(torch CPU tensors, the CUDA code path on the host).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastml import data

N = 10_007
KINDS = ["numpy", "npy", "arrow", "parquet", "device"]


def _dataset(kind: str, tmp_path, n: int = N) -> data.Dataset:
    i = np.arange(n, dtype=np.int64)
    x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    if kind == "numpy":
        return data.Dataset.from_numpy({"i": i, "x": x})
    if kind == "npy":
        np.save(tmp_path / "i.npy", i)
        np.save(tmp_path / "x.npy", x)
        return data.Dataset.from_npy({"i": tmp_path / "i.npy", "x": tmp_path / "x.npy"})
    if kind == "arrow":
        return data.Dataset.from_arrow(pa.table({"i": i, "x": x[:, 0]}))
    if kind == "parquet":
        pq.write_table(pa.table({"i": i, "x": x[:, 0]}), tmp_path / "d.parquet", row_group_size=997)
        return data.Dataset.from_parquet(tmp_path / "d.parquet")
    pytest.importorskip("torch")
    return data.Dataset.from_numpy({"i": i, "x": x}).to("cpu")


def _ids(batch) -> np.ndarray:
    return np.asarray(batch["i"]).copy()


class _Consumer(threading.Thread):
    """Iterates a loader once, recording the ids it got and what it raised."""

    def __init__(self, loader: data.Loader, first: threading.Event | None = None, pause=0.0):
        super().__init__(daemon=True)
        self.loader, self.first, self.pause = loader, first, pause
        self.ids: list[np.ndarray] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for b in self.loader:
                self.ids.append(_ids(b))
                if self.first is not None:
                    self.first.set()
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as e:  # recorded for the test to check
            self.error = e
        finally:
            if self.first is not None:
                self.first.set()


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_thread_cannot_iterate_a_live_loader(kind, tmp_path):
    for trial in range(5):
        ld = data.Loader(_dataset(kind, tmp_path), batch_size=50, seed=trial)
        first = threading.Event()
        a = _Consumer(ld, first, pause=0.0005)
        a.start()
        assert first.wait(30)
        b = _Consumer(ld)
        b.start()
        b.join(30)
        a.join(60)
        assert not a.is_alive() and not b.is_alive()
        assert isinstance(b.error, RuntimeError), b.error
        assert "another thread" in str(b.error) and b.ids == []
        assert a.error is None
        got = np.concatenate(a.ids)  # the live iteration kept every batch: one epoch
        assert np.array_equal(np.sort(got), np.arange(N))
        assert ld.epoch == 1
        # Once it finished, any thread may iterate (the next epoch).
        c = _Consumer(ld)
        c.start()
        c.join(60)
        assert c.error is None and sum(len(v) for v in c.ids) == N
        ld.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("call", ["close", "set_epoch", "load_state_dict"])
def test_ending_the_iteration_from_another_thread_wakes_its_consumer(kind, call, tmp_path):
    ds = _dataset(kind, tmp_path)
    for delay in (0.0, 0.002, 0.02):
        ld = data.Loader(ds, batch_size=50, seed=3, prefetch=1)
        state = ld.state_dict()
        first = threading.Event()
        a = _Consumer(ld, first)
        a.start()
        assert first.wait(30)
        time.sleep(delay)
        if call == "close":
            ld.close()
        elif call == "set_epoch":
            ld.set_epoch(5)
        else:
            ld.load_state_dict(state)
        a.join(30)
        assert not a.is_alive(), "the consumer stayed blocked"
        got = sum(len(v) for v in a.ids)
        if got < N or a.error is not None:  # ended early: told so, naming the call
            # (with every batch taken but the epoch's end not reached yet, too)
            assert isinstance(a.error, RuntimeError), a.error
            name = {"close": "Loader.close()"}.get(call, f"{call}()")
            assert name in str(a.error) and "another thread" in str(a.error)
        assert got <= N
        if call != "close":  # still usable: a full epoch from the state set
            assert sum(len(_ids(b)) for b in ld) == N
        ld.close()


@pytest.mark.parametrize("kind", KINDS)
def test_same_thread_calls_still_end_an_iteration_quietly(kind, tmp_path):
    ld = data.Loader(_dataset(kind, tmp_path), batch_size=50, seed=1)
    it = iter(ld)
    next(it)
    ld.set_epoch(2)
    assert next(it, None) is None  # ended, no error: the caller did it
    it = iter(ld)
    next(it)
    ld.close()
    assert next(it, None) is None
    with pytest.raises(RuntimeError, match="closed"):
        iter(ld)


def test_an_iterator_dropped_before_its_first_step_is_not_live(tmp_path):
    ld = data.Loader(_dataset("numpy", tmp_path), batch_size=50)
    it = iter(ld)  # never stepped: its cleanup never runs
    del it
    c = _Consumer(ld)
    c.start()
    c.join(60)
    assert c.error is None and sum(len(v) for v in c.ids) == N
    ld.close()
