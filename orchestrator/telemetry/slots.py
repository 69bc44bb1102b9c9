"""``orchestrate_leftover_replication_slots``: looked up when Prometheus scrapes
``orchestrate serve`` (the long-lived process; a release's own process ends).

A leftover slot is one orchestrate created that nobody reads (``active`` false): the
server keeps WAL for it until the disk fills. A slot of a running release is being
read, except for moments (a subscription re-enabled, a rollback settling), which the
alert's ``for: 30m`` rides out.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.config import ReleaseConfig
from orchestrator.errors import OrchestrateError
from orchestrator.logging import get_logger
from orchestrator.pg import replication
from orchestrator.pg.endpoint import Endpoint

log = get_logger("orchestrate.telemetry")

# A scrape waits for both sides: short, so one stalled server cannot time the scrape out.
CONNECT_TIMEOUT_S = 2.0
DEADLINE_S = 3.0


class SlotCollector(Collector):
    def __init__(self, cfg: ReleaseConfig) -> None:
        self.sides = [Endpoint(cfg.blue, "blue"), Endpoint(cfg.green, "green")]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        count = GaugeMetricFamily(
            "orchestrate_leftover_replication_slots",
            "Replication slots orchestrate created that nobody reads, per side.",
            labels=["side"])
        retained = GaugeMetricFamily(
            "orchestrate_leftover_replication_slot_retained_bytes",
            "WAL the leftover slots make the server keep, per side.", labels=["side"])
        for side in self.sides:
            try:
                with side.connect(attempts=1, connect_timeout=CONNECT_TIMEOUT_S,
                                  deadline=DEADLINE_S) as conn:
                    slots = [s for s in replication.orchestrate_slots(conn) if not s.active]
            except (OrchestrateError, OSError) as exc:
                # No sample rather than a wrong 0; green may not exist yet.
                log.debug("slot lookup failed", side=side.role, error=str(exc))
                continue
            count.add_metric([side.role], len(slots))
            retained.add_metric([side.role], sum(s.retained_bytes for s in slots))
        yield count
        yield retained

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Described without a lookup: registering must not connect to the databases.
        return iter(())
