"""The whole release configuration and its loader.

A wrong or missing field becomes one ``ConfigError`` that names the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from orchestrator.config._base import Duration, Name, _Model
from orchestrator.config.alerts import AlertsConfig
from orchestrator.config.canary import CanaryConfig
from orchestrator.config.database import (
    BackupConfig,
    DatabaseConfig,
    GreenConfig,
    MigrationsConfig,
    StateConfig,
)
from orchestrator.config.defaults import with_defaults
from orchestrator.config.metrics import PrometheusConfig
from orchestrator.config.notify import NotificationsConfig
from orchestrator.config.pair import SIDES, PairConfig
from orchestrator.config.routers import RouterConfig
from orchestrator.config.schedule import ScheduleConfig
from orchestrator.config.sync import SyncConfig
from orchestrator.config.telemetry import TelemetryConfig
from orchestrator.config.validate import ValidateConfig
from orchestrator.errors import ConfigError


class RollbackConfig(_Model):
    # After promotion, changes keep flowing green -> blue for this long, so that a
    # rollback inside the window loses nothing. Cleanup happens after it.
    window: Duration = 3600.0
    drop_green_database: bool = False


class ReleaseSection(_Model):
    # Empty (the default): named by orchestrate, see orchestrator.naming and
    # docs/recurring.md; a CronJob then needs no edit between runs.
    name: Name = ""
    service: str = "app"
    namespace: str = "default"
    version: str = "green"
    # How long one `orchestrate release` run may take, counted from its own start
    # (what a Job's activeDeadlineSeconds counts). Before it passes, by
    # deadline_margin (the time a rollback takes), a canary not yet promoted is
    # rolled back; one that could not finish in time is not started.
    deadline: Duration | None = None
    deadline_margin: Duration = 300.0


class ToolsConfig(_Model):
    # Directory holding pg_dump/pg_restore/psql; found automatically when unset.
    pg_bindir: Path | None = None


class ReleaseConfig(_Model):
    """The whole file. ``blue`` and ``green`` are required, unless ``pair`` names the
    two databases once (``a`` and ``b``; see docs/recurring.md): each run then takes
    the live side as blue and the other as green, and needs ``state.database``."""

    release: ReleaseSection
    blue: DatabaseConfig
    green: GreenConfig
    state: StateConfig = Field(default_factory=StateConfig)
    migrations: MigrationsConfig = Field(default_factory=MigrationsConfig)
    backup: BackupConfig = Field(default_factory=BackupConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)
    router: RouterConfig
    rollback: RollbackConfig = Field(default_factory=RollbackConfig)
    tools: ToolsConfig = Field(default_factory=ToolsConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    notifications: NotificationsConfig = Field(default_factory=NotificationsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    pair: PairConfig | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def state_db(self) -> DatabaseConfig:
        return self.state.database or self.blue

    def template_variables(self, *, window: str | None = None) -> dict[str, str]:
        """The values ``$name`` templates are filled with: check queries, alert
        matchers, and anything else that names this release. Every builder uses this.

        Precedence, lowest first: the release's own ``$service``, ``$namespace``,
        ``$version``, ``$release`` (and ``$window`` when given); then
        ``prometheus.labels``, which may override any of them (a metric whose label
        spells the service differently); last, set per evaluation by
        ``canary.analysis.render``, ``$colour`` and ``$other_colour``, which nothing
        overrides.
        """
        own = {"service": self.release.service, "namespace": self.release.namespace,
               "version": self.release.version, "release": self.release.name}
        if window is not None:
            own["window"] = window
        return {**own, **self.prometheus.labels}

    @model_validator(mode="before")
    @classmethod
    def _default_checks(cls, data: Any) -> Any:
        return with_defaults(data)

    @model_validator(mode="before")
    @classmethod
    def _sides_from_pair(cls, data: Any) -> Any:
        """With ``pair``, blue and green are filled from it (as ``initial_live`` says;
        ``orchestrator.pairing.resolve`` turns them round when the record says the
        other side is live), so that everything downstream sees blue and green."""
        if not isinstance(data, dict) or data.get("pair") is None:
            return data
        given = [k for k in ("blue", "green") if k in data]
        if given:
            raise ValueError(f"pair and {' and '.join(given)} are exclusive: name the two "
                             "databases once under pair (a, b), or blue and green as before")
        pair = data["pair"]
        if not isinstance(pair, dict) or not all(isinstance(pair.get(s), dict)
                                                 for s in ("a", "b")):
            raise ValueError("pair needs both sides, a and b, each a database")
        live = pair.get("initial_live", "a")
        blue, green = (pair["a"], pair["b"]) if live != "b" else (pair["b"], pair["a"])
        # Blue is a plain database; create_database only means something for green.
        blue = {k: v for k, v in blue.items() if k != "create_database"}
        return {**data, "blue": blue, "green": green}

    @model_validator(mode="after")
    def _pair_rules(self) -> ReleaseConfig:
        if self.pair is None:
            return self
        state = self.state.database
        if state is None:
            raise ValueError("pair needs state.database: the release record must live in a "
                             "database that is never recreated (neither a nor b)")
        for side in SIDES:
            db = self.pair.side(side)
            if (db.host, db.port, db.dbname) == (state.host, state.port, state.dbname):
                raise ValueError(f"state.database is pair.{side}: that database is dropped "
                                 "and recreated when it is green; use a third database")
        if self.router.kind == "ingress-nginx":
            raise ValueError("pair does not work with the ingress-nginx router: its canary "
                             "Ingress always names the same Service; use gateway, service or "
                             "haproxy")
        return self

    @model_validator(mode="after")
    def _distinct_databases(self) -> ReleaseConfig:
        b, g = self.blue, self.green
        if (b.host, b.port, b.dbname) == (g.host, g.port, g.dbname):
            raise ValueError("blue and green point at the same database")
        return self


def _format_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {
            "haproxy",
            "gateway",
            "ingress-nginx",
            "service",
            "fake",
        } and out.endswith("router"):
            continue  # the discriminator tag pydantic inserts; the user never wrote it
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def load_config(path: Path, *, base_dir: Path | None = None) -> ReleaseConfig:
    """Read and validate the file; relative paths are resolved against its folder."""
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"configuration file {path} not found",
            hint="pass --config PATH (see examples/ for a starting point)",
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return parse_config(raw, base_dir=base_dir or path.parent)


def parse_config(raw: dict[str, Any], *, base_dir: Path) -> ReleaseConfig:
    try:
        cfg = ReleaseConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _format_location(first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        more = len(exc.errors()) - 1
        extra = f" ({more} more problem{'s' if more > 1 else ''} after this one)" if more else ""
        raise ConfigError(
            f"invalid configuration: {field}: {msg}{extra}",
            hint="fix the field and run again; nothing was changed",
        ) from None
    return _resolve_paths(cfg, base_dir)


def _resolve_paths(cfg: ReleaseConfig, base: Path) -> ReleaseConfig:
    def fix(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    tls = cfg.alerts.tls
    alerts = cfg.alerts if tls is None else cfg.alerts.model_copy(update={
        "tls": tls.model_copy(update={"cert_file": fix(tls.cert_file),
                                      "key_file": fix(tls.key_file)})})
    return cfg.model_copy(
        update={
            "migrations": cfg.migrations.model_copy(update={"dir": fix(cfg.migrations.dir)}),
            "backup": cfg.backup.model_copy(update={"dir": fix(cfg.backup.dir)}),
            "alerts": alerts,
        }
    )
