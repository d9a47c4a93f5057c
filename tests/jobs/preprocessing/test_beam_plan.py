"""The Beam engine's split plan (pure functions; no Beam needed)."""

from __future__ import annotations

from jobs.preprocessing.beam.plan import Plan, locate, shard_count


def test_the_plan_cuts_exactly_where_a_full_sort_does():
    import random

    from jobs.preprocessing.beam.plan import prefix

    rng = random.Random(3)
    keys = [rng.randbytes(32) for _ in range(5000)] + [b"\x00\x00" + rng.randbytes(30) for _ in range(50)]
    hist: dict[int, tuple[int, int]] = {}
    for key in keys:
        count, size = hist.get(prefix(key), (0, 0))
        hist[prefix(key)] = (count + 1, size + 100)
    for limit, n_eval in ((5050, 505), (4000, 1), (5050, 0), (1, 0), (3000, 2999)):
        plan = Plan.from_histogram(hist, limit, n_eval, shard_bytes=20_000)
        buckets = {b: [k for k in keys if prefix(k) == b] for b in plan.cut_buckets()}
        plan.settle(buckets)
        ordered = sorted(keys)
        assert [k for k in ordered if plan.split_of(k) == "eval"] == ordered[:n_eval]
        assert [k for k in ordered if plan.split_of(k) == "train"] == ordered[n_eval:limit]
        for split in ("eval", "train"):
            shards = [plan.shard_of(split, k) for k in ordered if plan.split_of(k) == split]
            assert shards == sorted(shards) and max(shards, default=0) < plan.shards[split]  # contiguous key ranges
        assert plan.shards["train"] == max(1, -(-(limit - n_eval) * 100 // 20_000))


def test_locate_and_shard_count_edges():
    hist = {3: (2, 10), 9: (1, 5)}
    assert locate(hist, 0).bucket == 3 and locate(hist, 1).rank == 1 and locate(hist, 2).bucket == 9 and locate(hist, 3) is None
    assert shard_count(0, 10, 100) == 1 and shard_count(10, 10, 100, shard_bytes=30) == 4
