"""A small deterministic data loader with a resumable position (saved in checkpoints).

``DataLoader({"x": X, "y": Y}, batch_size=32, shuffle=True, seed=0)`` yields feed dicts of exactly
``batch_size`` rows (plans have a static batch dimension, so each epoch's incomplete tail is skipped in
training; use ``libml-run`` — which pads — for inference over every row).  The order of epoch ``e`` is
the permutation drawn from ``np.random.default_rng([seed, e])``, so the position ``(epoch, batch)`` alone
determines every future batch: ``state_dict()`` / ``load_state_dict()`` resume exactly.  Arrays may be
memory-mapped (``np.load(path, mmap_mode="r")``); only the rows of one batch are read at a time.

Sharding for data-parallel training (``DataLoader(arrays, batch_size, rank=r, size=K)``, e.g. with
``lc.distributed.rank()`` / ``size()``): ``batch_size`` is the per-rank batch, and global batch ``b`` of an
epoch is rows ``order[b*G:(b+1)*G]`` of the epoch's order (``G = batch_size * K``), sorted; rank ``r`` gets
its ``r``-th slice of ``batch_size`` rows.  The ranks' parts of each epoch are disjoint, the epoch order does
not depend on ``K``, and the K slices of global batch ``b`` put together are the batch a single loader
with ``batch_size = G`` yields, row for row.  The position (epoch, global batch) is the same on every rank.
"""
from __future__ import annotations

import numpy as np


class DataLoader:
    def __init__(self, arrays: dict, batch_size: int, shuffle=True, seed=0, rank=0, size=1):
        if not arrays:
            raise ValueError("DataLoader needs at least one array")
        lens = {k: len(v) for k, v in arrays.items()}
        if len(set(lens.values())) != 1:
            raise ValueError(f"DataLoader arrays must have the same number of rows, got {lens}")
        self.n = next(iter(lens.values()))
        self.batch_size = int(batch_size)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1 or \
                isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < size:
            raise ValueError(f"DataLoader: rank must be in [0, size) and size >= 1, got rank={rank!r} size={size!r}")
        self.rank, self.size = int(rank), int(size)
        if not 1 <= self.batch_size * self.size <= self.n:
            raise ValueError(f"batch_size must be in [1, {self.n // self.size}] for {self.n} rows over {self.size} "
                             f"rank(s), got {batch_size}")
        self.arrays = dict(arrays)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.epoch, self.batch = 0, 0
        self._perm_epoch, self._perm = None, None

    @property
    def batches_per_epoch(self):
        return self.n // (self.batch_size * self.size)

    def _order(self):
        if self._perm_epoch != self.epoch:
            self._perm = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                          else np.arange(self.n))
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self):
        """The next feed dict; advances the position (rolling over to the next epoch)."""
        G = self.batch_size * self.size
        idx = self._order()[self.batch * G:(self.batch + 1) * G]
        if self.shuffle:
            idx = np.sort(idx)  # sequential reads of memory-mapped arrays; the set of rows is what is random
        idx = idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        feeds = {k: np.ascontiguousarray(v[idx]) for k, v in self.arrays.items()}
        self.batch += 1
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return feeds

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "shuffle": self.shuffle,
                "batch_size": self.batch_size, "n": self.n, "size": self.size}

    def check_state(self, d):
        """Raise ValueError unless ``d`` is a position of a loader over the same data and settings."""
        for k in ("seed", "shuffle", "batch_size", "n", "size"):
            if d.get(k, 1 if k == "size" else None) != getattr(self, k):  # (states before sharding: size 1)
                raise ValueError(f"loader state {k}={d.get(k)!r} does not match this loader ({getattr(self, k)!r})")
        e, b = d.get("epoch"), d.get("batch")
        if type(e) is not int or type(b) is not int or e < 0 or not 0 <= b < self.batches_per_epoch:
            raise ValueError(f"loader state position (epoch={e!r}, batch={b!r}) is invalid")

    def load_state_dict(self, d):
        self.check_state(d)
        self.epoch, self.batch = d["epoch"], d["batch"]
