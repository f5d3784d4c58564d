"""Adapter label sets of the app's metrics stay bounded (issue 25: they never shrank).

Ray's metrics API cannot remove a label set, so serve_app/metrics.py caps the distinct values
of the ``adapter`` label per process; gauge values give their place back once unset (Ray's
agent drops their series, tests/serve/test_metrics.py). No Ray here: a fake metric records
what would have been exported.
"""

from __future__ import annotations

import pytest

from serve_app import metrics


class _Recorder:
    def __init__(self):
        self.tags: list[dict] = []

    def inc(self, value, tags=None):
        self.tags.append(tags)

    observe = set = inc


def _fake(m: metrics._Lazy) -> tuple[metrics._Lazy, _Recorder, list[float]]:
    """A fresh copy of ``m`` (same kind, labels and bounds) exporting into a recorder, on a fake clock."""
    kind, name, description, tag_keys, boundaries = m._args
    copy = metrics._Lazy(kind, name, description, tag_keys, boundaries, bounded=m._bounded)
    rec, now = _Recorder(), [0.0]
    copy.__dict__["_metric"] = rec  # the cached_property's slot: no Ray metric is created
    copy.clock = lambda: now[0]
    return copy, rec, now


def test_adapter_labelled_metrics_are_bounded():
    for m in (metrics.REQUESTS, metrics.GENERATED_TOKENS, metrics.PREFIX_HIT_RATE):
        assert m._bounded == ("adapter",), m._args[1]


def test_counter_gets_at_most_max_label_values_adapters(monkeypatch):
    monkeypatch.setattr(metrics, "MAX_LABEL_VALUES", 4)
    m, rec, now = _fake(metrics.REQUESTS)
    for i in range(10):  # a tenant registering adapters in a loop, one request each
        m.inc(tags={"adapter": f"a{i}", "path": "lora"})
        now[0] += 1000  # counters never give a place back, however long ago
    m.inc(tags={"adapter": "a2", "path": "merged"})  # a known value keeps its own series
    exported = [t["adapter"] for t in rec.tags]
    assert exported == ["a0", "a1", "a2", "a3"] + [metrics.OTHER] * 6 + ["a2"]
    assert {t["path"] for t in rec.tags} == {"lora", "merged"}  # other labels untouched
    assert len({(t["adapter"], t["path"]) for t in rec.tags}) <= 2 * (4 + 1)


def test_gauge_value_unset_for_a_while_gives_its_place_back(monkeypatch):
    """The per-version hit-rate gauge: a retired version (PrefixStats.forget) is no longer set;
    its series ages out of Ray's agent and its place here goes to a new version."""
    monkeypatch.setattr(metrics, "MAX_LABEL_VALUES", 2)
    m, rec, now = _fake(metrics.PREFIX_HIT_RATE)
    m.set(0.5, tags={"adapter": "t@v1"})
    m.set(0.5, tags={"adapter": "t@v2"})
    m.set(0.5, tags={"adapter": "t@v3"})  # full: v1 was set just now
    assert rec.tags[-1] == {"adapter": metrics.OTHER}
    for _ in range(30):  # the replica's 5 s export loop; v1 is retired, v2 still served
        now[0] += 5
        m.set(0.4, tags={"adapter": "t@v2"})
    m.set(0.5, tags={"adapter": "t@v3"})
    assert rec.tags[-1] == {"adapter": "t@v3"}
    m.set(0.5, tags={"adapter": "t@v4"})  # v2 and v3 are live: no place
    assert rec.tags[-1] == {"adapter": metrics.OTHER}


@pytest.mark.parametrize("tags", [None, {}])
def test_unlabelled_calls_pass_through(tags):
    m, rec, _ = _fake(metrics.KV_PREEMPTIONS)
    m.set(3, tags=tags)
    assert rec.tags == [tags]
