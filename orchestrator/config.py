"""The release configuration: a YAML file validated against pydantic models.

Secrets are never written inline: a password is a reference to an environment
variable or a file, resolved only when a connection is opened. A wrong or
missing field becomes one ``ConfigError`` that names the field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """'250ms', '30s', '5m', '1h' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s', '5m'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration; write e.g. '30s', '5m', '1h' or 250ms")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Name = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9_-]{0,46}[a-z0-9])?$")]


class _Model(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Model):
    """Where a secret comes from. Exactly one of ``env`` and ``file``."""

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' (a variable name) or 'file' (a path)")
        return self

    def describe(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"

    def resolve(self) -> str:
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(
                    f"the environment variable {self.env} is not set",
                    hint=f"export {self.env}=... before running orchestrate",
                )
            return value
        assert self.file is not None
        try:
            return self.file.read_text().rstrip("\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot read the secret file {self.file}: {exc.strerror}",
                hint="check the path and that this user may read it",
            ) from exc


class DatabaseConfig(_Model):
    """How orchestrate reaches one database, and how the *other* cluster reaches it."""

    host: str = "127.0.0.1"
    port: int = Field(default=5432, ge=1, le=65535)
    dbname: str
    user: str
    password: SecretRef | None = None
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = (
        "prefer"
    )
    connect_timeout: Duration = 10.0
    # The address the peer cluster uses for replication (a Service name in Kubernetes,
    # for instance); defaults to host/port.
    peer_host: str | None = None
    peer_port: int | None = Field(default=None, ge=1, le=65535)
    # The application's login role, fenced at switchover; defaults to none (no fencing
    # by role, only the replication catch-up).
    app_role: str | None = None

    def conninfo(
        self, *, dbname: str | None = None, for_peer: bool = False, with_password: bool = True
    ) -> str:
        """A libpq conninfo string. With the password in it: never log it."""
        parts = {
            "host": (self.peer_host or self.host) if for_peer else self.host,
            "port": str((self.peer_port or self.port) if for_peer else self.port),
            "dbname": dbname or self.dbname,
            "user": self.user,
            "sslmode": self.sslmode,
            "connect_timeout": str(max(1, int(self.connect_timeout))),
        }
        if with_password and self.password is not None:
            parts["password"] = self.password.resolve()
        return " ".join(f"{k}={_quote_conninfo(v)}" for k, v in parts.items())

    def describe(self) -> str:
        """Safe for logs: no password."""
        return f"{self.user}@{self.host}:{self.port}/{self.dbname}"

    def subprocess_env(self) -> dict[str, str]:
        """Environment for pg_dump/psql: the password travels here, never on argv
        (where any local user could read it in ps)."""
        env = {"PGAPPNAME": "orchestrate", "PGCONNECT_TIMEOUT": str(int(self.connect_timeout))}
        if self.password is not None:
            env["PGPASSWORD"] = self.password.resolve()
        return env


def _quote_conninfo(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class GreenConfig(DatabaseConfig):
    # Create the database on the green server if it does not exist yet.
    create_database: bool = True


class StateConfig(_Model):
    """Where the release's own state lives. Defaults to a schema in blue's database."""

    database: DatabaseConfig | None = None
    schema_name: Annotated[str, Field(alias="schema", pattern=r"^[a-z_][a-z0-9_]*$")] = (
        "orchestrate"
    )
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class MigrationsConfig(_Model):
    dir: Path = Path("migrations")
    # What the lint does with changes that break logical replication or lock hot tables.
    lint: Literal["error", "warn", "off"] = "error"


class BackupConfig(_Model):
    dir: Path = Path("backups")
    format: Literal["custom", "directory"] = "custom"
    jobs: int = Field(default=1, ge=1, le=64)
    timeout: Duration = 6 * 3600.0
    # Skip the backup (only for throw-away environments; the release log says so).
    enabled: bool = True


class SyncConfig(_Model):
    max_lag_bytes: int = Field(default=1024 * 1024, ge=0)
    initial_copy_timeout: Duration = 6 * 3600.0
    catchup_timeout: Duration = 600.0
    poll_interval: Duration = 1.0
    # Tables (schema.table) left out of replication and validation.
    exclude_tables: list[str] = Field(default_factory=list)
    # Writes to green while blue still takes writes need green's changes to flow back
    # to blue (origin = none, PostgreSQL 16+ on both sides). Without it, sending
    # traffic to green risks losing green's writes on rollback; this flag says the
    # operator accepts that risk.
    accept_write_loss_risk: bool = False
    # Extra headroom added to sequences on green beyond blue's value, so rows inserted
    # on either side during the canary never collide.
    sequence_margin: int = Field(default=1_000_000, ge=0)


class ValidateConfig(_Model):
    checksums: bool = True
    chunk_rows: int = Field(default=100_000, ge=100)
    parallelism: int = Field(default=2, ge=1, le=64)
    max_reported_keys: int = Field(default=20, ge=1)
    # Column mapping for tables whose shape the migration changes on purpose:
    # {"public.orders": {"amount_cents": "amount"}} means green's amount_cents holds
    # blue's amount.
    column_map: dict[str, dict[str, str]] = Field(default_factory=dict)
    ignore_columns: dict[str, list[str]] = Field(default_factory=dict)


class MetricCheck(_Model):
    """A PromQL query evaluated every interval, against a threshold or a range.

    The query is a template in ``string.Template`` syntax (``$colour``), which keeps
    PromQL's braces intact: $colour, $service, $namespace, $version, $release and
    $window are filled in, plus the labels of ``prometheus.labels``.
    """

    name: Name
    query: str
    max: float | None = None
    min: float | None = None
    # Compare with blue: fail when green's value exceeds blue's value (same query with
    # colour=blue) by more than this.
    max_increase_over_blue: float | None = None
    failure_limit: int = Field(default=1, ge=1)
    inconclusive_limit: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _has_threshold(self) -> MetricCheck:
        if self.max is None and self.min is None and self.max_increase_over_blue is None:
            raise ValueError("a check needs 'max', 'min' or 'max_increase_over_blue'")
        return self


class CanaryStage(_Model):
    weight: int = Field(ge=0, le=100)
    duration: Duration = 60.0
    # Stop before this stage until someone runs `orchestrate promote`.
    manual_gate: bool = False


def _default_stages() -> list[CanaryStage]:
    return [
        CanaryStage(weight=0, duration=30.0),
        CanaryStage(weight=5, duration=60.0),
        CanaryStage(weight=20, duration=60.0),
        CanaryStage(weight=100, duration=60.0),
    ]


class CanaryConfig(_Model):
    interval: Duration = 10.0
    window: Duration = 30.0
    stages: list[CanaryStage] = Field(default_factory=_default_stages)
    checks: list[MetricCheck] = Field(default_factory=list)
    # What too many inconclusive evaluations (no data, Prometheus down) do.
    on_inconclusive: Literal["rollback", "pause"] = "rollback"

    @field_validator("stages")
    @classmethod
    def _increasing(cls, stages: list[CanaryStage]) -> list[CanaryStage]:
        if not stages:
            raise ValueError("at least one stage is needed")
        weights = [s.weight for s in stages]
        if weights != sorted(weights):
            raise ValueError(f"stage weights must not decrease, got {weights}")
        if weights[-1] != 100:
            raise ValueError("the last stage must send 100 % of traffic to green")
        return stages


class PrometheusConfig(_Model):
    url: str = "http://127.0.0.1:9090"
    timeout: Duration = 5.0
    bearer_token: SecretRef | None = None
    # Labels filled into check templates besides colour/service/namespace/version.
    labels: dict[str, str] = Field(default_factory=dict)


class HAProxyRouterConfig(_Model):
    kind: Literal["haproxy"]
    # The runtime API: a unix socket path, or host:port of a TCP stats socket.
    socket: str
    backend: str = "app"
    blue_server: str = "blue"
    green_server: str = "green"
    timeout: Duration = 5.0


class KubeTarget(_Model):
    kubeconfig: Path | None = None
    context: str | None = None
    namespace: str = "default"
    timeout: Duration = 10.0


class GatewayRouterConfig(KubeTarget):
    kind: Literal["gateway"]
    route: str
    # Index of the HTTPRoute rule carrying the blue/green backendRefs.
    rule: int = Field(default=0, ge=0)
    blue_service: str
    green_service: str


class IngressNginxRouterConfig(KubeTarget):
    kind: Literal["ingress-nginx"]
    # The canary Ingress (annotated nginx.ingress.kubernetes.io/canary: "true").
    canary_ingress: str


class ServiceRouterConfig(KubeTarget):
    kind: Literal["service"]
    service: str
    selector_key: str = "colour"
    blue_value: str = "blue"
    green_value: str = "green"


class FakeRouterConfig(_Model):
    """In-memory router, for plans and tests that do not need a real one."""

    kind: Literal["fake"]


RouterConfig = Annotated[
    HAProxyRouterConfig
    | GatewayRouterConfig
    | IngressNginxRouterConfig
    | ServiceRouterConfig
    | FakeRouterConfig,
    Field(discriminator="kind"),
]


class RollbackConfig(_Model):
    # After promotion, changes keep flowing green -> blue for this long, so that a
    # rollback inside the window loses nothing. Cleanup happens after it.
    window: Duration = 3600.0
    drop_green_database: bool = False


class ReleaseSection(_Model):
    name: Name
    service: str = "app"
    namespace: str = "default"
    version: str = "green"


class ToolsConfig(_Model):
    # Directory holding pg_dump/pg_restore/psql; found automatically when unset.
    pg_bindir: Path | None = None


class ReleaseConfig(_Model):
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

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def state_db(self) -> DatabaseConfig:
        return self.state.database or self.blue

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

    return cfg.model_copy(
        update={
            "migrations": cfg.migrations.model_copy(update={"dir": fix(cfg.migrations.dir)}),
            "backup": cfg.backup.model_copy(update={"dir": fix(cfg.backup.dir)}),
        }
    )
