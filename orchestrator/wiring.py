"""A ``Release`` wired to the real backends and listeners its config names: the
router, Prometheus, and the event sinks (notifications, metrics). The faces call
``release_for``; the machine itself depends only on the interfaces, and tests build
a ``Release`` with fakes instead.
"""

from __future__ import annotations

from typing import Any

from orchestrator.canary.metrics import PrometheusMetrics
from orchestrator.config import ReleaseConfig
from orchestrator.events import Events
from orchestrator.live import sinks_for
from orchestrator.machine import Release
from orchestrator.notify import attach_notifications
from orchestrator.routers import build_router
from orchestrator.store import StateStore
from orchestrator.telemetry import with_metrics


def release_for(cfg: ReleaseConfig, *, store: StateStore | None = None, **kw: Any) -> Release:
    """The Release the CLI and the receiver run. ``kw`` goes to ``Release``; its
    ``events``, if given, keep their sinks and gain the config's."""
    store = store or StateStore.for_config(cfg)
    # A live view on a terminal listens too, starting from what the store holds.
    events = kw.get("events") or Events(sinks_for(kw.get("display"), cfg, store))
    kw["events"] = with_metrics(cfg, attach_notifications(cfg, events))
    return Release(cfg, store=store,
                   router=build_router(cfg.router), metrics=PrometheusMetrics(cfg.prometheus),
                   **kw)
