"""libml_models: small data sets and model builders shipped with libml.

``load_digits`` loads the 8x8 handwritten digits (UCI, Alpaydin & Kaynak 1998, CC BY 4.0; see README.md).
``builders`` (imported lazily) builds the benchmark graphs with the libml API.
"""
from importlib import resources

import numpy as np

__all__ = ["load_digits", "digits_arrays"]


def digits_arrays():
    """Raw arrays ``(X uint8 (1797, 64) values 0..16, y uint8 (1797,))``."""
    # files(__name__) works both when installed as libml_models and when imported from the source tree.
    with resources.files(__name__).joinpath("digits.npz").open("rb") as f:
        with np.load(f) as d:
            return d["X"].copy(), d["y"].copy()


def load_digits(split_seed=0, test_fraction=0.2):
    """Deterministic train/test split of the digits data.

    Returns ``(Xtr, ytr, Xte, yte)``: X float32 scaled to [0, 1] (pixel / 16), shape (n, 64);
    y int64 labels 0..9.  The split is a permutation drawn from ``np.random.default_rng(split_seed)``;
    the test part has ``round(test_fraction * 1797)`` samples.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    X, y = digits_arrays()
    n = X.shape[0]
    perm = np.random.default_rng(split_seed).permutation(n)
    n_test = int(round(test_fraction * n))
    te, tr = perm[:n_test], perm[n_test:]
    Xf = X.astype(np.float32) / np.float32(16.0)
    yi = y.astype(np.int64)
    return (np.ascontiguousarray(Xf[tr]), np.ascontiguousarray(yi[tr]),
            np.ascontiguousarray(Xf[te]), np.ascontiguousarray(yi[te]))
