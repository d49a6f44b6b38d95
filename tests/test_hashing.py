"""Stable hashes are frozen: the values below are the ones mmcat has always produced, so that users' packed splits
and sample keys (stable_hash) and the data order of resumed runs (stable_seed) never move with an upgrade."""
from mmcat.hashing import stable_hash, stable_seed
from mmcat.pack.plan import safe_key
from mmcat.pack.split import assign_splits


def test_stable_hash_split_and_keys_are_frozen():
    assert stable_hash(0, "split", "p000001") == 11484159174190942922
    assert stable_hash(7, "order", "Küche-9") == 3676008925408870512
    items = [(f"p{i:03d}", "ab"[i % 2]) for i in range(10)]
    assert assign_splits(items, {"train": 0.6, "val": 0.2, "test": 0.2}, 0) == {
        "train": ["p004", "p007", "p009", "p003", "p008", "p002"], "val": ["p006", "p001"], "test": ["p005", "p000"]}
    assert (safe_key("a.b"), safe_key("Küche 9")) == ("a_b_d489dc91", "K_che_9_a1d863ee")


def test_stable_seed_is_frozen_and_fits_63_bits():
    assert stable_seed(0, 1, "shards") == 33103015021386562
    assert stable_seed(3, "step", 0, 2, 5) == 4679817507604190199
    assert all(0 <= stable_seed(s, "sample", i) < 2**63 for s in range(20) for i in range(20))


def test_stable_hashes_equal_stable_hash_value_by_value():
    """The vectorised form the catalog planner uses must give exactly the frozen per-value hashes (split
    assignment and sample order of existing datasets depend on them)."""
    from mmcat.hashing import stable_hash, stable_hashes

    ids = ["p1", "", "a.b", "ü-x", "0123", "x" * 200, "nul\0inside"]
    for prefix in ((0, "split"), (7, "order"), ()):
        got = stable_hashes(ids, *prefix)
        assert got.dtype.name == "uint64"
        assert [int(h) for h in got] == [stable_hash(*prefix, i) for i in ids]
