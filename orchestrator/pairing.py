"""A database pair (``pair: {a, b}``): which side is blue this run, and recreating green.

``resolve`` turns a loaded config into the one this run uses: the release name
(``orchestrator.naming``), and, with ``pair``, blue = the live side recorded in the
control state (``live_side``; ``pair.initial_live`` before the first record), green
= the other side. The router's blue/green names and the check queries' ``$colour``
follow the sides, so the rest of orchestrate sees blue and green as with a config
that names them. ``StateStore.live_on_done`` makes the release that reaches done
record green as live in the same transaction.

``prepare_green`` runs before a new release starts: green still holds the database
of the release before (it was blue then), and a release needs an empty green. It is
dropped only when nothing says it is in use:

- the router sends green no traffic;
- green holds no subscription, publication or replication slot but those of
  releases of this control schema that are over;
- the tables on it were left by one of our releases that is over: the record says
  a done release left this side, or its provision marker names such a release.

Anything else refuses the release, with what was found. See docs/recurring.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from orchestrator import naming
from orchestrator.config import ReleaseConfig
from orchestrator.config.canary import CanaryConfig
from orchestrator.config.defaults import default_checks
from orchestrator.config.metrics import MetricCheck
from orchestrator.config.pair import PairRoutes, Side, other
from orchestrator.errors import PreflightError
from orchestrator.logging import get_logger
from orchestrator.pg import catalog, replication, schema
from orchestrator.pg.conn import scalar
from orchestrator.pg.endpoint import Endpoint
from orchestrator.routers.base import TrafficRouter
from orchestrator.store import StateStore

log = get_logger("orchestrate")

# Template variables ``canary.analysis.render`` reads for ``$colour``.
COLOUR_OF = {"blue": "colour_of_blue", "green": "colour_of_green"}
# The application of each side in metrics: fixed to its database, not to its role.
DEFAULT_COLOURS = PairRoutes(a="blue", b="green")

_ROUTE_FIELDS = {"haproxy": ("blue_server", "green_server"),
                 "gateway": ("blue_service", "green_service"),
                 "service": ("blue_value", "green_value")}


def resolve(cfg: ReleaseConfig, store: StateStore, *, starting: bool) -> ReleaseConfig:
    """The config of this run: named, and with a pair, blue = the live side."""
    if cfg.pair is not None:
        cfg = with_sides(cfg, live_side(cfg, store))
        store.live_on_done = green_side(cfg)
    name = naming.release_name(cfg, store, starting=starting)
    if name != cfg.release.name:
        cfg = cfg.model_copy(update={"release": cfg.release.model_copy(update={"name": name})})
    return cfg


def live_side(cfg: ReleaseConfig, store: StateStore) -> Side:
    assert cfg.pair is not None
    record = store.live_side()
    if record is None:
        return cfg.pair.initial_live
    live = record[0]
    return "b" if live == "b" else "a"


def routes(cfg: ReleaseConfig) -> PairRoutes:
    """Each side's name on the router, from ``pair.routes`` or the router section."""
    assert cfg.pair is not None
    if cfg.pair.routes is not None:
        return cfg.pair.routes
    fields = _ROUTE_FIELDS.get(cfg.router.kind)
    if fields is None:
        return DEFAULT_COLOURS
    return PairRoutes(a=getattr(cfg.router, fields[0]), b=getattr(cfg.router, fields[1]))


def with_sides(cfg: ReleaseConfig, live: Side) -> ReleaseConfig:
    """``cfg`` with blue = ``live`` and green = the other side. Applied to a config as
    loaded (the router's names are read as a's and b's)."""
    pair = cfg.pair
    assert pair is not None
    green = other(live)
    names = routes(cfg)
    update: dict[str, Any] = {
        "blue": pair.as_blue(live),
        "green": pair.as_green(green),
    }
    fields = _ROUTE_FIELDS.get(cfg.router.kind)
    if fields is not None:
        update["router"] = cfg.router.model_copy(update={
            fields[0]: names.of(live), fields[1]: names.of(green)})
        canary = _defaults_for(cfg, update["router"])
        if canary is not None:
            update["canary"] = canary
    labels = {**cfg.prometheus.labels, COLOUR_OF["blue"]: DEFAULT_COLOURS.of(live),
              COLOUR_OF["green"]: DEFAULT_COLOURS.of(green)}
    update["prometheus"] = cfg.prometheus.model_copy(update={"labels": labels})
    return cfg.model_copy(update=update)


def _defaults_for(cfg: ReleaseConfig, router: Any) -> CanaryConfig | None:
    """The default checks name the router's servers (a's and b's) in their queries:
    when the config's checks are those defaults, they are built again for the swapped
    router, or green's query would read the live side. None when they are not."""
    before = default_checks(cfg.router.model_dump())
    if before is None or [c.model_dump(exclude_none=True)
                          for c in cfg.canary.checks] != before:
        return None
    after = default_checks(router.model_dump()) or []
    return cfg.canary.model_copy(update={
        "checks": [MetricCheck.model_validate(c) for c in after]})


def green_side(cfg: ReleaseConfig) -> Side:
    """Which side a resolved config's green is."""
    assert cfg.pair is not None
    g = cfg.green
    a = cfg.pair.a
    return "a" if (g.host, g.port, g.dbname) == (a.host, a.port, a.dbname) else "b"


# ---------------------------------------------------------------- recreating green


class GreenInUse(PreflightError):
    """Green's database may still be in use: it is left as it is."""


def prepare_green(cfg: ReleaseConfig, store: StateStore, router: TrafficRouter) -> bool:
    """Drop green's database, left by the release before, when it is provably ours
    and idle; the release then provisions it afresh. True if it was dropped.

    Only for a new release of a pair: a release that has a record owns green already
    (its provisioning is resumable), and one that is not over yet blocks the start."""
    if cfg.pair is None or store.get(cfg.release.name) is not None:
        return False
    if store.unfinished() is not None:
        return False
    end = Endpoint(cfg.green, "green")
    found = _inspect(end, cfg.green.dbname, cfg.state.schema_name)
    if found is None:
        return False
    side = green_side(cfg)
    where = f"green ({side}: {cfg.green.describe()})"
    if not cfg.green.create_database and (found.tables or found.markers):
        raise GreenInUse(
            f"{where} would have to be dropped and created again, but this side says "
            "create_database: false",
            hint="let orchestrate create it (create_database: true and CREATEDB for its "
            "user), or empty that database by hand; nothing was changed")
    _refuse_traffic(where, router)
    finished = store.finished_names()
    _refuse_foreign(where, found, finished)
    record = store.live_side()
    left_by_done = record is not None and record[1] == side and record[2] in finished
    if found.tables and not (left_by_done or found.markers & finished):
        raise GreenInUse(
            f"{where} already holds tables ({', '.join(found.tables[:5])}) that no "
            "finished release of this control schema left there",
            hint="a pair's green is recreated only when the record shows it was ours; "
            "empty or drop that database by hand if it is not needed; nothing was changed")
    if not found.tables and not found.markers:
        return False  # an empty database (made by hand, say): provisioned as it is
    _drop(end, cfg.green.dbname, found.subs, found.slots)
    log.info("pair green recreated", side=side, database=cfg.green.describe(),
             tables=len(found.tables))
    return True


@dataclass(frozen=True)
class _Found:
    """What green's database holds that decides whether it may be recreated."""

    slots: list[str]
    subs: list[str]
    pubs: list[str]
    tables: list[str]
    markers: set[str]


def _inspect(end: Endpoint, dbname: str, control: str) -> _Found | None:
    """None when green's database does not exist."""
    with end.connection("pair", dbname="postgres") as server:
        if not catalog.database_exists(server, dbname):
            return None
        slots = [r[0] for r in server.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s",
            (dbname,)).fetchall()]
        subs = [r[0] for r in server.execute(
            "SELECT subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
            "WHERE d.datname = %s", (dbname,)).fetchall()]
    with end.connection("pair") as db:
        pubs = [r[0] for r in db.execute("SELECT pubname FROM pg_publication").fetchall()]
        return _Found(slots, subs, pubs, schema.foreign_tables(db, control),
                      _markers(db, control))


def _refuse_traffic(where: str, router: TrafficRouter) -> None:
    weights = router.current()
    if weights.green > 0:
        raise GreenInUse(
            f"{where} takes {weights.green}% of the traffic on {router.describe()}, so "
            "its database cannot be recreated for this release",
            hint="the live side is not the one the release record says: check the router "
            "and `orchestrate status`; nothing was changed")


def _refuse_foreign(where: str, found: _Found, finished: set[str]) -> None:
    ours = {n for r in finished for n in (replication.forward(r).base,
                                          replication.reverse(r).base)}
    foreign = ([f"subscription {s}" for s in found.subs if s not in ours]
               + [f"publication {p}" for p in found.pubs if p not in ours]
               + [f"replication slot {s}" for s in found.slots if s not in ours])
    if foreign:
        raise GreenInUse(
            f"{where} holds {', '.join(foreign[:5])}, which no finished release of this "
            "control schema created: something else replicates from or into it",
            hint="find out what uses it and remove it, or point the pair at another "
            "database; nothing was changed")


def _markers(db: psycopg.Connection[Any], control: str) -> set[str]:
    if not scalar(db, "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
                  control, schema.MARKER_TABLE):
        return set()
    rows = db.execute(sql.SQL("SELECT release FROM {}.{}").format(
        sql.Identifier(control), sql.Identifier(schema.MARKER_TABLE))).fetchall()
    return {r[0] for r in rows}


def _drop(end: Endpoint, dbname: str, subs: list[str], slots: list[str]) -> None:
    # A subscription or a slot on the database keeps DROP DATABASE from running.
    if subs:
        with end.connection("pair") as db:
            for sub in subs:
                replication.drop_subscription(db, sub)
    with end.connection("pair", dbname="postgres") as server:
        for slot in slots:
            replication.drop_slot(server, slot)
        # FORCE ends the sessions of the application that served this side; the
        # router sends it no traffic (checked), and its pool reconnects once the
        # database is back.
        server.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(dbname)))
