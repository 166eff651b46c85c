"""Helpers shared by the drift tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def progress_during(fn: Callable[[], Any]) -> int:
    """How far a pure-Python counting thread gets while ``fn`` runs on another thread.

    With the GIL held for the whole native call the counter cannot move (beyond
    a switch interval before the call starts); with it released it counts freely.
    """
    count = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    seen: list[int] = []

    def work() -> None:
        before = count[0]
        fn()
        seen.append(count[0] - before)

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
    finally:
        stop.set()
        spinner.join()
    return seen[0]
