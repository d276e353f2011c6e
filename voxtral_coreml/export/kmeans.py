"""The k-means behind the palettize recipes, run in worker processes: every LUT group (a whole tensor, or a group of
output channels) is one task, clustered by coremltools' own function, on one thread (deterministic_kmeans), so the
LUTs do not depend on how many workers there are. coremltools' palettize pass then takes them through its custom
`lut_function`, found by each group's bytes.

Two moments: `LutsAhead` starts on the module's weights (fp16, as the program will store them) while the module
converts, on the CPUs the conversion leaves; `cluster_luts` clusters whatever the program holds that was not done
ahead, on every CPU. A group found nowhere is clustered by the pass itself, by the same function: the package's
bytes never depend on any of this. The workers come from a fork server, never forked from the converting process,
whose threads (torch's, tqdm's) may hold locks.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

Group = tuple[np.ndarray, int]  # (values, nbits)
Clustered = tuple[np.ndarray, np.ndarray]  # (lut, indices), as coremltools' "kmeans" mode returns them
CHUNKS_PER_WORKER = 16  # groups go to the workers in chunks: this many chunks per worker
AHEAD_CHUNKS = 256  # finer while converting: `collect` waits for the chunks already started, and cancels the rest
# Below this many values in all, workers cost more than they save: a fork server that imports coremltools takes
# ~4 s to start, the k-means of 1M fp16 values at 6 bits about as long on one thread. The pass clusters them.
WORTH_WORKERS = 1_000_000


def kmeans_workers() -> int:
    """The CPUs this process may use: k-means worker processes when a caller names no number."""
    return len(os.sched_getaffinity(0))


def worth_workers(groups: list[Group]) -> bool:
    return sum(values.size for values, _ in groups) >= WORTH_WORKERS


def _one_thread() -> None:
    """A k-means worker's start: one thread for its whole life (see compress.deterministic_kmeans)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


def group_key(values: np.ndarray, nbits: int) -> bytes:
    digest = hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16)
    digest.update(repr((values.shape, values.dtype.str, nbits)).encode())
    return digest.digest()


def cluster(values: np.ndarray, nbits: int) -> Clustered:
    """One LUT group: what coremltools' palettize pass computes for it in "kmeans" mode."""
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    return palettize_weights._get_lut_and_indices(values, "KMEANS", nbits, None)


def _cluster_keyed(groups: list[Group]) -> list[tuple[bytes, Clustered]]:
    return [(group_key(values, nbits), cluster(values, nbits)) for values, nbits in groups]


def lut_groups(values: np.ndarray, block_sizes: list[int], channel_axis: int) -> list[np.ndarray]:
    """The groups coremltools' `blockwise_compress` clusters one by one, split as it splits them."""
    group = values.shape[channel_axis]
    for axis, size in enumerate(block_sizes):
        if size not in (0, values.shape[axis]):
            channel_axis, group = axis, size
    data = np.swapaxes(values, 0, channel_axis) if channel_axis else values
    return [] if data.shape[0] % group else np.split(data, data.shape[0] // group, axis=0)  # unsplittable: skipped


def _pool(jobs: int) -> ProcessPoolExecutor:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "coremltools.optimize.coreml._quantization_passes"])
    return ProcessPoolExecutor(jobs, context, initializer=_one_thread)


def _chunks(groups: list[Group], count: int) -> list[list[Group]]:
    ordered = sorted(groups, key=lambda group: -group[0].size)  # the largest first: the last to finish are small
    size = max(1, len(ordered) // count)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


@dataclass
class KmeansLuts:
    """Clustered groups by key, handed to the pass through `lut_function`; `missed` counts the groups it asked for
    that were not there (clustered on the spot)."""

    found: dict[bytes, Clustered]
    missed: int = 0

    def lut_function(self, nbits: int) -> Callable[[np.ndarray], Clustered]:
        def lookup(values: np.ndarray) -> Clustered:
            result = self.found.pop(group_key(values, nbits), None)
            if result is None:
                self.missed += 1
                result = cluster(values, nbits)
            return result

        return lookup


@dataclass
class LutsAhead:
    """Clusters `groups` in `jobs` background processes (none for 0) until `collect`: what is done by then."""

    groups: list[Group]
    jobs: int
    _pool: ProcessPoolExecutor | None = field(default=None, init=False)
    _futures: list[Future] = field(default_factory=list, init=False)

    def __enter__(self) -> LutsAhead:
        if self.jobs > 0 and worth_workers(self.groups):
            self._pool = _pool(self.jobs)
            self._futures = [self._pool.submit(_cluster_keyed, chunk) for chunk in _chunks(self.groups, AHEAD_CHUNKS)]
        return self

    def collect(self) -> dict[bytes, Clustered]:
        if self._pool is None:
            return {}
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
        done = [f.result() for f in self._futures if not f.cancelled()]
        log.info("k-means: %d of %d LUT groups clustered during conversion", sum(map(len, done)), len(self.groups))
        return dict(pair for chunk in done for pair in chunk)

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def cluster_luts(groups: list[Group], jobs: int, known: dict[bytes, Clustered]) -> KmeansLuts:
    """`known` and every group of `groups` not in it, clustered in `jobs` processes (none for one job or too little
    work: the pass clusters them)."""
    todo = [(values, nbits) for values, nbits in groups if group_key(values, nbits) not in known]
    if jobs <= 1 or not worth_workers(todo):
        return KmeansLuts(known)
    start = time.monotonic()
    with _pool(jobs) as pool:
        for chunk in pool.map(_cluster_keyed, _chunks(todo, CHUNKS_PER_WORKER * jobs)):
            known.update(chunk)
    log.info("k-means: %d LUT groups clustered in %d processes, %.1f s", len(todo), jobs, time.monotonic() - start)
    return KmeansLuts(known)
