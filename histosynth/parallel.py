"""Per-patch stages on several CPU cores: the work is mostly Python holding the GIL (region
properties, watershed, table building), so threads do not help it; forked processes do."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")

_task: Callable | None = None  # the function the forked workers run: inherited, never pickled


def _run(item):
    return _task(item)


def forked_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """fn(item) for each item, yielded in order as they finish: in this process when workers is
    1 (or there is one item), else on `workers` forked processes. Forking lets `fn` be a closure
    over unpicklable state (only items and results are pickled); `fn` must open its own files
    (a slide handle's file offset would be shared across the fork) and use no GPU."""
    global _task
    workers = min(workers, len(items))
    if workers <= 1 or not hasattr(os, "fork"):
        yield from map(fn, items)
        return
    _task = fn
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            yield from pool.map(_run, items)
    finally:
        _task = None


def map_chunks(fn: Callable[[range], R], count: int, workers: int, *, desc: str, progress: bool = True) -> Iterator[R]:
    """fn(positions) over consecutive ranges covering range(count), in order, on forked_map's
    `workers` processes, with a progress bar over the positions. There are about 8 ranges per
    worker, so that the bar moves and a slow stretch of patches does not idle the other workers."""
    size = max(1, -(-count // max(1, workers * 8)))
    parts = [range(start, min(start + size, count)) for start in range(0, count, size)]
    with tqdm(total=count, desc=desc, unit="patch", disable=not progress, mininterval=2) as bar:
        for positions, result in zip(parts, forked_map(fn, parts, workers)):
            bar.update(len(positions))
            yield result
