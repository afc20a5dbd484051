"""A small deterministic data loader with a resumable position (saved in checkpoints).

``DataLoader({"x": X, "y": Y}, batch_size=32, shuffle=True, seed=0)`` yields feed dicts of exactly
``batch_size`` rows (plans have a static batch dimension, so each epoch's incomplete tail is skipped in
training; use ``libml-run`` — which pads — for inference over every row).  The order of epoch ``e`` is
the permutation drawn from ``np.random.default_rng([seed, e])``, so the position ``(epoch, batch)`` alone
determines every future batch: ``state_dict()`` / ``load_state_dict()`` resume exactly.  Arrays may be
memory-mapped (``np.load(path, mmap_mode="r")``); only the rows of one batch are read at a time.
"""
from __future__ import annotations

import numpy as np


class DataLoader:
    def __init__(self, arrays: dict, batch_size: int, shuffle=True, seed=0):
        if not arrays:
            raise ValueError("DataLoader needs at least one array")
        lens = {k: len(v) for k, v in arrays.items()}
        if len(set(lens.values())) != 1:
            raise ValueError(f"DataLoader arrays must have the same number of rows, got {lens}")
        self.n = next(iter(lens.values()))
        self.batch_size = int(batch_size)
        if not 1 <= self.batch_size <= self.n:
            raise ValueError(f"batch_size must be in [1, {self.n}], got {batch_size}")
        self.arrays = dict(arrays)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.epoch, self.batch = 0, 0
        self._perm_epoch, self._perm = None, None

    @property
    def batches_per_epoch(self):
        return self.n // self.batch_size

    def _order(self):
        if self._perm_epoch != self.epoch:
            self._perm = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                          else np.arange(self.n))
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self):
        """The next feed dict; advances the position (rolling over to the next epoch)."""
        idx = self._order()[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]
        if self.shuffle:
            idx = np.sort(idx)  # sequential reads of memory-mapped arrays; the set of rows is what is random
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
                "batch_size": self.batch_size, "n": self.n}

    def check_state(self, d):
        """Raise ValueError unless ``d`` is a position of a loader over the same data and settings."""
        for k in ("seed", "shuffle", "batch_size", "n"):
            if d.get(k) != getattr(self, k):
                raise ValueError(f"loader state {k}={d.get(k)!r} does not match this loader ({getattr(self, k)!r})")
        e, b = d.get("epoch"), d.get("batch")
        if type(e) is not int or type(b) is not int or e < 0 or not 0 <= b < self.batches_per_epoch:
            raise ValueError(f"loader state position (epoch={e!r}, batch={b!r}) is invalid")

    def load_state_dict(self, d):
        self.check_state(d)
        self.epoch, self.batch = d["epoch"], d["batch"]
