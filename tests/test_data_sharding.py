"""DataLoader(rank=, size=): each rank a disjoint part of every epoch, the epoch order independent of K, the
K shards of a global batch put together equal to the single loader's batch (runtime/libml_runtime/data.py)."""
import numpy as np
import pytest

from libml_runtime.data import DataLoader


def _arrays(n=50):
    return {"x": np.arange(n * 3, dtype=np.float32).reshape(n, 3), "y": np.arange(n)}


@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_of_each_global_batch_are_the_single_loaders_batch_row_for_row(shuffle):
    one = DataLoader(_arrays(), 12, shuffle=shuffle, seed=5)
    for K in (2, 3, 4):
        shards = [DataLoader(_arrays(), 12 // K, shuffle=shuffle, seed=5, rank=r, size=K) for r in range(K)]
        ref = DataLoader(_arrays(), 12, shuffle=shuffle, seed=5)
        assert shards[0].batches_per_epoch == one.batches_per_epoch == 4
        for _ in range(10):  # across epoch boundaries
            want = ref.next_batch()
            got = [s.next_batch() for s in shards]
            assert np.array_equal(np.concatenate([b["y"] for b in got]), want["y"])
            assert np.array_equal(np.concatenate([b["x"] for b in got]), want["x"])


def test_ranks_see_disjoint_rows_within_an_epoch():
    shards = [DataLoader(_arrays(), 5, seed=1, rank=r, size=2) for r in range(2)]
    seen = [np.concatenate([s.next_batch()["y"] for _ in range(s.batches_per_epoch)]) for s in shards]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 2 * 5 * 5  # 5 global batches of 10 rows


def test_sharded_position_resumes_and_refuses_another_world_size():
    a = DataLoader(_arrays(), 4, seed=2, rank=1, size=2)
    for _ in range(7):
        a.next_batch()
    b = DataLoader(_arrays(), 4, seed=2, rank=1, size=2)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.next_batch()["y"], b.next_batch()["y"])
    with pytest.raises(ValueError, match="size"):
        DataLoader(_arrays(), 4, seed=2, rank=0, size=3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="rank"):
        DataLoader(_arrays(), 4, rank=2, size=2)
