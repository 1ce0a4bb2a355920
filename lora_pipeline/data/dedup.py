"""Exact de-duplication in 8 bytes per distinct row: 64-bit fingerprints in sorted numpy runs.

A Python ``set`` of ints costs ~70 bytes per entry; here a fingerprint is one int64 in a sorted array.
Batches of keys are looked up with :func:`numpy.searchsorted` in every run, then added as a new run;
runs of similar size are merged (a log-structured merge), and a run stops growing at
:data:`MAX_RUN_KEYS`, so a merge never needs more than ``2 x MAX_RUN_KEYS x 8`` bytes of scratch
memory. Lookups cost one binary search per run (about ``log2(n / batch) + n / MAX_RUN_KEYS`` runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: A run stops growing at this many keys (8 MB): merges stay small, lookups touch few runs.
MAX_RUN_KEYS = 1 << 20


class FingerprintSet:
    """An exact, append-only set of signed 64-bit fingerprints."""

    def __init__(self, max_run_keys: int | None = None) -> None:
        self._runs: list[np.ndarray] = []  # sorted, pairwise disjoint int64 arrays, largest first
        self._max_run = max_run_keys or MAX_RUN_KEYS

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for run in self._runs)

    def __contains__(self, key: int) -> bool:
        probe = np.array([key], dtype=np.int64)
        return bool(self._seen(probe)[0])

    def _seen(self, keys: np.ndarray) -> np.ndarray:
        """For each of ``keys`` (any order), whether it is already in the set."""
        seen = np.zeros(len(keys), dtype=bool)
        for run in self._runs:
            at = np.searchsorted(run, keys)
            np.minimum(at, len(run) - 1, out=at)
            seen |= run[at] == keys
        return seen

    def add_batch(self, keys: Sequence[int] | np.ndarray) -> np.ndarray:
        """Add ``keys`` in order; return for each whether it was seen before (earlier in the batch or before it).

        The first occurrence of a key is never "seen"; every later one is: exactly what a ``set``
        checked and updated one key at a time would say.
        """
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys):
            return np.zeros(0, dtype=bool)
        distinct, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        before = self._seen(distinct)
        repeated = first[inverse] != np.arange(len(keys))
        fresh = distinct[~before]  # sorted, and disjoint from every run
        if len(fresh):
            self._push(fresh)
        return before[inverse] | repeated

    def _push(self, run: np.ndarray) -> None:
        self._runs.append(run)
        # Merge the two newest runs while the newer is at least half the older's size and the result
        # stays under the cap: sizes then shrink geometrically towards the newest run.
        while len(self._runs) > 1:
            older, newer = self._runs[-2], self._runs[-1]
            if 2 * len(newer) < len(older) or len(older) + len(newer) > self._max_run:
                break
            merged = np.concatenate((older, newer))
            merged.sort(kind="stable")  # two sorted runs: timsort merges them in linear time
            self._runs[-2:] = [merged]
