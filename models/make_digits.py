"""Regenerate ``models/digits.npz``: the 8x8 handwritten digits data set.

Source: the UCI "Optical Recognition of Handwritten Digits" data set (E. Alpaydin and C. Kaynak, 1998,
CC BY 4.0), test part, exactly as shipped inside scikit-learn (``sklearn.datasets.load_digits``,
1,797 images of 8x8 pixels, values 0..16, labels 0..9).

This script needs scikit-learn installed (``pip install scikit-learn``); scikit-learn is NOT a
dependency of libml: the generated file is committed, and this script only documents and reproduces it.

Usage: ``python models/make_digits.py [OUT.npz]`` (default: digits.npz beside this file).
Writes ``np.savez_compressed(out, X=uint8 (1797, 64), y=uint8 (1797,))``.
"""
import os
import sys

import numpy as np


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
    from sklearn.datasets import load_digits  # bundled data file, no download

    d = load_digits()
    X = np.asarray(d.data)
    y = np.asarray(d.target)
    assert X.shape == (1797, 64) and y.shape == (1797,)
    assert X.min() >= 0 and X.max() <= 16 and np.all(X == np.round(X))
    assert set(np.unique(y).tolist()) == set(range(10))
    np.savez_compressed(out, X=X.astype(np.uint8), y=y.astype(np.uint8))
    print(f"wrote {out}: X {X.shape} uint8 0..16, y {y.shape} uint8 0..9")


if __name__ == "__main__":
    main()
