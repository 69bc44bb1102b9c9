"""Built-in checks: request success rate and latency, per metrics provider.

The library lives in ``orchestrator/config/builtin.py`` (see its docstring for the
providers and their queries): loading a config expands each ``canary.builtin`` entry
into a ``MetricCheck``, and the configuration must not import the canary runtime,
which imports the configuration. Re-exported here, where the canary docs point.
"""

from orchestrator.config.builtin import (
    DEFAULT_THRESHOLDS,
    PROVIDERS,
    Provider,
    QueryBuilder,
    Selector,
    expand,
    matcher,
    queries,
    selector_for,
    unsupported,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "PROVIDERS",
    "Provider",
    "QueryBuilder",
    "Selector",
    "expand",
    "matcher",
    "queries",
    "selector_for",
    "unsupported",
]
