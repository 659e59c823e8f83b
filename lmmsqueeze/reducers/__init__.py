"""Visual token reducers: the registry and the built-in plugins (one per module)."""

from . import (  # noqa: F401  (import registers the built-ins)
    bilinear,
    dart,
    divprune,
    fastervlm,
    fastv,
    maxpool,
    pdrop,
    pool,
    prumerge,
    random,
    sparsevlm,
    stride,
    tome,
    visionzip,
    vispruner,
)
from .base import Reducer, ScoredPruner, Signals, TokenState, check_keep, resolve_keep, top_k_slots
from .registry import (
    ENTRY_POINT_GROUP,
    create_reducer,
    get_reducer,
    list_reducers,
    load_plugins,
    reducer_info,
    reducer_params,
    register_reducer,
    unregister_reducer,
)
from .search import LAST_LAYER, SearchRange, search_ranges, searchable

__all__ = [
    "ENTRY_POINT_GROUP",
    "LAST_LAYER",
    "Reducer",
    "ScoredPruner",
    "SearchRange",
    "Signals",
    "TokenState",
    "check_keep",
    "create_reducer",
    "get_reducer",
    "list_reducers",
    "load_plugins",
    "reducer_info",
    "reducer_params",
    "register_reducer",
    "resolve_keep",
    "search_ranges",
    "searchable",
    "top_k_slots",
    "unregister_reducer",
]
