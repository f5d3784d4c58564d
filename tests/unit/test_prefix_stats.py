"""Per-version prefix-cache stats shrink when a version retires (issue 25).

``PrefixStats`` is keyed by ``id@vN``: without ``forget`` every version ever served kept an
entry, and so did the per-adapter hit-rate gauge the LoRA replica exports from it.
"""

from serve_app.engine.kv_cache import BlockPool, PrefixStats


def test_forget_drops_one_version_and_keeps_the_rest():
    stats = PrefixStats()
    for adapter in ("a@v1", "a@v2", "b@v1", None):
        stats.add(adapter, 64, 32)
    assert stats.forget("a@v1") is True
    assert stats.forget(("b@v1", 7)) is True  # the prefix-cache key form: (id@vN, load id)
    assert set(stats.queried) == set(stats.hit) == {"a@v2", None}
    assert stats.forget("a@v1") is False and stats.forget("never@v3") is False
    assert stats.forget(None) is False and None in stats.queried  # the base model stays
    stats.add("a@v1", 16, 0)  # a version served again starts from zero
    assert stats.queried["a@v1"] == 16 and stats.hit["a@v1"] == 0


def test_pool_stats_stop_listing_a_forgotten_version():
    pool = BlockPool(8, 4)
    for v in range(1, 51):  # a tenant re-registering its adapter 50 times
        pool.prefix.add(f"t@v{v}", 8, 4)
        if v > 1:
            pool.prefix.forget(f"t@v{v - 1}")
    by_adapter = pool.stats()["prefix_hit_rate_by_adapter"]
    assert by_adapter == {"t@v50": 0.5}
    # The totals stay cumulative: forgetting a version does not take back what it counted.
    assert (pool.prefix.total_queried, pool.prefix.total_hit) == (50 * 8, 50 * 4)
