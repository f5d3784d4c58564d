"""The two places the deployments reach into Ray Serve's private multiplexing state.

Serve has no public API to list a replica's loaded multiplexed models or to unload one. Both
deployments need that (to retire old versions at once instead of at the next LRU eviction), so
it is done here, once, against the wrapper ``serve.multiplexed`` stores on the decorated
function (the Ray 2.4x-2.60 layout). If that layout changes, ``loaded_models`` is empty and
``announce_change`` does nothing: old versions are then freed at the next eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

_WRAPPER = "__serve_multiplex_wrapper"


def loaded_models(load_fn: Callable[..., Any]) -> OrderedDict:
    """Serve's LRU of loaded models (multiplexed ID -> model) for ``load_fn``; pop from it to
    drop one. Empty when Serve has not loaded anything yet."""
    models = getattr(getattr(load_fn, _WRAPPER, None), "models", None)
    return models if models is not None else OrderedDict()


def announce_change(load_fn: Callable[..., Any]) -> None:
    """Tell Serve's routers at once that this replica's model set changed (after a pop)."""
    wrapper = getattr(load_fn, _WRAPPER, None)
    if wrapper is not None:
        wrapper._push_multiplexed_replica_info = True
