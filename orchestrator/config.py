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
from orchestrator.matchers import parse_matcher
from orchestrator.pg.names import parse_qualified

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
            where = f"the environment variable {self.env}"
        else:
            assert self.file is not None
            try:
                value = self.file.read_text().rstrip("\n")
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the secret file {self.file}: {exc.strerror}",
                    hint="check the path and that this user may read it",
                ) from exc
            where = f"the secret file {self.file}"
        if not value:
            # An empty secret is a deployment mistake (a Secret key not mounted, a
            # variable exported empty), never a password: say so before any server
            # sees a login attempt.
            raise ConfigError(f"{where} is empty",
                              hint="put the secret there, or fix the reference in the config")
        return value


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
    # A server that stops answering without closing its connections (a paused VM, a
    # blackholed path) is invisible without deadlines. Keepalives and
    # tcp_user_timeout let the kernel drop a dead network path (also for the
    # subscription's and pg_dump/psql's connections, which get them through the
    # conninfo); a paused server's kernel still answers TCP, so every statement the
    # orchestrator waits on has a client-side deadline too (``statement_deadline``),
    # after which the connection is dropped and the step fails or retries.
    keepalives_idle: Duration = 10.0
    keepalives_interval: Duration = 5.0
    keepalives_count: int = Field(default=3, ge=1, le=100)
    tcp_user_timeout: Duration = 30.0
    statement_deadline: Duration = 60.0
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
            "keepalives": "1",
            "keepalives_idle": str(max(1, int(self.keepalives_idle))),
            "keepalives_interval": str(max(1, int(self.keepalives_interval))),
            "keepalives_count": str(self.keepalives_count),
            "tcp_user_timeout": str(max(1000, int(self.tcp_user_timeout * 1000))),
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


class InitialCopyConfig(_Model):
    """``sync.initial_copy`` in the release config."""

    # snapshot: orchestrate copies (parallel pipes, COPY FREEZE, indexes rebuilt as each
    # table is in) and the subscription streams from the copy's slot. subscription:
    # logical replication's own initial sync, with more sync workers for the run.
    method: Literal["snapshot", "subscription"] = "snapshot"
    # Parallel copy pipes / index builds / sync workers; default: this machine's cores.
    jobs: int | None = Field(default=None, ge=1, le=64)
    # Splitting a table into page ranges copied in parallel. auto: only where that at
    # least halves the copy's estimated duration, because a split table cannot be
    # loaded with COPY FREEZE (see plan_copy); always / never force it.
    split: Literal["auto", "always", "never"] = "auto"
    # Size of a page range; default: total size / (4 * jobs), within 64 MiB .. 1 GiB.
    chunk_bytes: int | None = Field(default=None, ge=8 * 1024 * 1024)
    # auto: binary COPY for tables whose column types allow it; never: always text.
    binary: Literal["auto", "never"] = "auto"
    # COPY .. FREEZE for tables copied whole.
    freeze: bool = True
    # Per index-building session (there are ``jobs`` of them). No space: it travels
    # as a ``-c`` startup option.
    maintenance_work_mem: str = Field(default="512MB", pattern=r"^\d+(kB|MB|GB)?$")
    # Parallel workers per index build; default: cores / jobs - 1, at least 1.
    max_parallel_maintenance_workers: int | None = Field(default=None, ge=0, le=64)
    # ANALYZE the copied tables before green is declared ready.
    analyze: bool = True
    # Creating the slot waits for transactions running on blue to end.
    slot_timeout: Duration = 600.0
    # A copy pipe that moves no byte for this long fails the copy, naming the table:
    # a paused server (blue or green) otherwise holds the copy until
    # initial_copy_timeout (hours). Generous: a large sort on blue moves nothing for
    # a while only with an ORDER BY, which the copy never uses.
    stall_timeout: Duration = 120.0


class SyncConfig(_Model):
    max_lag_bytes: int = Field(default=1024 * 1024, ge=0)
    initial_copy_timeout: Duration = 6 * 3600.0
    catchup_timeout: Duration = 600.0
    poll_interval: Duration = 1.0
    # Tables (schema.table) left out of replication and validation; a part holding a
    # dot or a double quote is written in double quotes: '"my.schema".t' (names.py).
    exclude_tables: list[str] = Field(default_factory=list)
    # Writes to green while blue still takes writes need green's changes to flow back
    # to blue (origin = none, PostgreSQL 16+ on both sides). Without it, sending
    # traffic to green risks losing green's writes on rollback; this flag says the
    # operator accepts that risk.
    accept_write_loss_risk: bool = False
    # Extra headroom added to sequences on green beyond blue's value, so rows inserted
    # on either side during the canary never collide.
    sequence_margin: int = Field(default=1_000_000, ge=0)
    initial_copy: InitialCopyConfig = Field(default_factory=InitialCopyConfig)

    @field_validator("exclude_tables")
    @classmethod
    def _table_names(cls, tables: list[str]) -> list[str]:
        for t in tables:
            parse_qualified(t)
        return tables


class ValidateConfig(_Model):
    """How green is compared with blue (see docs/validation.md)."""

    # False: row counts only (no content checksums, no row diffs).
    checksums: bool = True
    # Rows per first-level chunk (a primary-key range). Smaller chunks make a mismatch
    # cheaper to narrow down; larger ones mean fewer queries (each costs ~0.3 ms of
    # planning and round trip, against ~6 ms of reading for 20,000 rows).
    chunk_rows: int = Field(default=20_000, ge=100)
    # Worker connections per side: blue and green queries run in parallel, each side
    # with this many connections.
    parallelism: int = Field(default=2, ge=1, le=64)
    # Differing keys listed per table in problems and in the report.
    max_reported_keys: int = Field(default=20, ge=1)
    # Column mapping for tables whose shape the migration changes on purpose:
    # {"public.orders": {"amount_cents": "amount"}} means green's amount_cents holds
    # blue's amount.
    column_map: dict[str, dict[str, str]] = Field(default_factory=dict)
    ignore_columns: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("column_map", "ignore_columns")
    @classmethod
    def _table_keys(cls, entries: dict[str, Any]) -> dict[str, Any]:
        for t in entries:
            parse_qualified(t)
        return entries

    # Bisection: a mismatching range is split into enough parts (at most
    # split_factor) that each should hold at most leaf_rows rows, and again while a
    # part holds more; then its rows are fetched from both sides and compared by key.
    split_factor: int = Field(default=256, ge=2, le=1024)
    leaf_rows: int = Field(default=128, ge=1, le=10_000)
    # Differing keys collected per table before the search stops (the report then
    # says "at least N").
    max_diff_keys: int = Field(default=1000, ge=1)
    # While replication streams: how many times a mismatching chunk is compared again
    # after a catch-up, and how many rounds a differing key must survive.
    recheck_rounds: int = Field(default=3, ge=1, le=20)
    # Lock the differing rows on the publishing side (SELECT .. FOR SHARE) while the
    # subscriber catches up, so that a confirmed difference is exact. Writers to those
    # few rows wait for at most the catch-up.
    lock_rows: bool = True
    lock_timeout: Duration = 2.0
    # Two independent 64-bit row hashes per chunk instead of one (about 1.5x the CPU).
    strong_checksums: bool = False
    statement_timeout: Duration = 3600.0
    # Tables without a primary key are compared whole; above this many rows the
    # differing rows themselves are not searched for.
    nokey_diff_max_rows: int = Field(default=1_000_000, ge=0)


class MetricCheck(_Model):
    """A PromQL query evaluated every interval, against a threshold or a range.

    The query is a template in ``string.Template`` syntax (``$colour``), which keeps
    PromQL's braces intact: $colour, $service, $namespace, $version, $release and
    $window are filled in, plus the labels of ``prometheus.labels``.
    """

    name: Name
    query: str
    # The query for blue, for comparisons, when blue's series cannot be selected by
    # substituting $colour (ingress-nginx marks canary requests with a non-empty
    # ``canary`` label instead of a name). Default: ``query`` with colour=blue.
    baseline_query: str | None = None
    max: float | None = None
    min: float | None = None
    # Compare with blue: fail when green's value exceeds blue's value (same query with
    # colour=blue) by more than this. For "lower is worse" values (a success rate),
    # ``max_decrease_from_blue`` fails when green is below blue by more than this.
    max_increase_over_blue: float | None = None
    max_decrease_from_blue: float | None = Field(default=None, ge=0)
    failure_limit: int = Field(default=1, ge=1)
    inconclusive_limit: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _has_threshold(self) -> MetricCheck:
        if (self.max is None and self.min is None and self.max_increase_over_blue is None
                and self.max_decrease_from_blue is None):
            raise ValueError("a check needs 'max', 'min', 'max_increase_over_blue' or "
                             "'max_decrease_from_blue'")
        if self.max is not None and self.min is not None and self.min > self.max:
            raise ValueError(f"'min' ({self.min}) is above 'max' ({self.max}): no value "
                             "could pass")
        return self

    @property
    def compares_with_blue(self) -> bool:
        return self.max_increase_over_blue is not None or self.max_decrease_from_blue is not None


class ColourValues(_Model):
    """A selector label whose value differs by colour, e.g. ingress-nginx's ``canary``
    label: ``{blue: "", green: "!"}`` (empty on blue's requests, set on green's)."""

    blue: str
    green: str


class BuiltinCheck(_Model):
    """A named check from the library in ``orchestrator/canary/builtin.py``, written for
    one metrics provider; expanded into a ``MetricCheck`` when the config is loaded.

    ``selector`` overrides the provider's default label matchers (see docs/canary.md):
    ``"v"`` equals, ``"~re"`` matches a regex, ``"!v"`` / ``"!~re"`` negate, ``null``
    drops a default label, ``{blue: .., green: ..}`` gives a value per colour.
    Without any threshold the library's default applies (success rate >= 0.99,
    p99 <= 0.5 s, average <= 0.25 s).
    """

    check: Literal["request-success-rate", "latency-p99", "latency-average"]
    provider: Literal["haproxy", "ingress-nginx", "envoy", "istio", "demo"]
    # The check's name in measurements and in stage ``checks`` lists; default: ``check``.
    name: Name | None = None
    selector: dict[str, str | ColourValues | None] = Field(default_factory=dict)
    max: float | None = None
    min: float | None = None
    max_increase_over_blue: float | None = None
    max_decrease_from_blue: float | None = Field(default=None, ge=0)
    failure_limit: int = Field(default=1, ge=1)
    inconclusive_limit: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _supported(self) -> BuiltinCheck:
        # Imported here: the library imports this module for MetricCheck.
        from orchestrator.canary.builtin import unsupported

        problem = unsupported(self.check, self.provider)
        if problem:
            raise ValueError(problem)
        return self


_HEADER_FORMS = ("a header is a string, or {env: NAME} or {file: /path} (exactly one of "
                 "them), with an optional prefix such as 'Bearer '")


def _header_value(value: Any) -> Any:
    # A plain string is the header's value; a mapping reads it from a secret.
    if isinstance(value, str):
        return {"value": value}
    if not isinstance(value, dict | HeaderValue):
        raise ValueError(_HEADER_FORMS)
    return value


class HeaderValue(_Model):
    """A hook's header: a plain value, or one read from a secret when the hook is
    called (never stored in the config): ``{env: SMOKE_TOKEN, prefix: "Bearer "}``."""

    value: str | None = None
    env: str | None = None
    file: Path | None = None
    prefix: str = ""

    @model_validator(mode="after")
    def _one_source(self) -> HeaderValue:
        if sum(x is not None for x in (self.value, self.env, self.file)) != 1:
            raise ValueError(_HEADER_FORMS)
        return self

    def resolve(self) -> str:
        if self.value is not None:
            return self.prefix + self.value
        return self.prefix + SecretRef(env=self.env, file=self.file).resolve()


class Webhook(_Model):
    """An HTTP call before or after a canary stage (a smoke test, a load test, a
    notification); see ``orchestrator/canary/hooks.py``. A 2xx answer passes."""

    name: Name
    url: str
    method: Literal["POST", "PUT"] = "POST"
    # Per attempt; connection errors, timeouts and 408/425/429/502/503/504 are retried
    # ``retries`` times, any other answer is the hook's verdict.
    timeout: Duration = 10.0
    retries: int = Field(default=2, ge=0, le=10)
    headers: dict[str, Annotated[HeaderValue, BeforeValidator(_header_value)]] = Field(
        default_factory=dict)
    # Extra fields for the JSON body, e.g. which smoke test suite to run.
    metadata: dict[str, str] = Field(default_factory=dict)
    on_failure: Literal["rollback", "ignore"] = "rollback"

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        if re.match(r"^https?://[^/@\s]*@", url):
            # Credentials in a URL end up in logs and in the stored config.
            raise ValueError("the URL holds credentials; send them in a header with a "
                             "secret reference instead: headers: {Authorization: "
                             "{env: NAME, prefix: 'Bearer '}}")
        return url

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, timeout: float) -> float:
        if timeout <= 0:
            raise ValueError("a hook's timeout must be more than 0s")
        return timeout


class CanaryStage(_Model):
    weight: int = Field(ge=0, le=100)
    duration: Duration = 60.0
    # Stop before this stage until someone runs `orchestrate promote`.
    manual_gate: bool = False
    # Evaluation interval for this stage; default: canary.interval.
    interval: Duration | None = None
    # Names of the checks evaluated in this stage; default: all of canary.checks.
    checks: list[str] | None = None
    # Hooks run in order before traffic moves to this stage's weight (after a manual
    # gate), and after the stage's analysis passed.
    before: list[Webhook] = Field(default_factory=list)
    after: list[Webhook] = Field(default_factory=list)

    @field_validator("interval")
    @classmethod
    def _positive_interval(cls, interval: float | None) -> float | None:
        if interval is not None and interval <= 0:
            raise ValueError("a stage's interval must be more than 0s")
        return interval


def _default_stages() -> list[CanaryStage]:
    return [
        CanaryStage(weight=0, duration=30.0),
        CanaryStage(weight=5, duration=60.0),
        CanaryStage(weight=20, duration=60.0),
        CanaryStage(weight=100, duration=60.0),
    ]


class ProbeConfig(_Model):
    """The other side's health, a check of its own (``orchestrator/pg/probe.py``): a
    statement on green (and on blue until promotion) every ``interval`` (the canary's
    analysis interval by default), through every stage and the rollback window."""

    # Per probe: connecting and answering ``SELECT 1``. A paused server answers
    # neither; a loaded one answers well within this.
    timeout: Duration = 5.0
    interval: Duration | None = None
    # Consecutive failed probes that fail the stage (or, in the window, roll back).
    failure_limit: int = Field(default=3, ge=1)


class CanaryConfig(_Model):
    interval: Duration = 10.0
    window: Duration = 30.0
    stages: list[CanaryStage] = Field(default_factory=_default_stages)
    # Checks from the built-in library, expanded into ``checks`` when the config is
    # loaded (declared before ``checks``: its validator reads them). A check in
    # ``checks`` with the same name replaces the built-in one.
    builtin: list[BuiltinCheck] = Field(default_factory=list)
    checks: list[MetricCheck] = Field(default_factory=list, validate_default=True)
    # What too many inconclusive evaluations (no data, Prometheus down) do.
    on_inconclusive: Literal["rollback", "pause"] = "rollback"
    probe: ProbeConfig = Field(default_factory=ProbeConfig)

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

    @field_validator("checks")
    @classmethod
    def _with_builtins(cls, checks: list[MetricCheck], info: Any) -> list[MetricCheck]:
        # ``info`` is pydantic's ValidationInfo; ``data`` holds the fields validated
        # so far (``builtin`` is absent when it was itself invalid).
        names = [c.name for c in checks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"check names must be unique; repeated: {', '.join(twice)}")
        builtins: list[BuiltinCheck] = info.data.get("builtin") or []
        if not builtins:
            return checks
        from orchestrator.canary.builtin import expand

        expanded = [expand(b) for b in builtins]
        names_b = [c.name for c in expanded]
        twice = sorted({n for n in names_b if names_b.count(n) > 1})
        if twice:
            raise ValueError(f"two built-in checks are named {', '.join(twice)}; give one "
                             "of them a 'name'")
        own = set(names)
        return [*(c for c in expanded if c.name not in own), *checks]

    @model_validator(mode="after")
    def _stage_checks_exist(self) -> CanaryConfig:
        known = {c.name for c in self.checks}
        for i, stage in enumerate(self.stages):
            unknown = [n for n in stage.checks or [] if n not in known]
            if unknown:
                raise ValueError(
                    f"stages[{i}].checks names {', '.join(unknown)}, which is not a check "
                    f"(known: {', '.join(sorted(known)) or 'none'})")
            hooks = [h.name for h in (*stage.before, *stage.after)]
            twice = sorted({n for n in hooks if hooks.count(n) > 1})
            if twice:
                raise ValueError(f"stages[{i}]: hook names must be unique within a stage "
                                 f"(they name its measurements); repeated: {', '.join(twice)}")
        return self

    def checks_for(self, stage: CanaryStage) -> list[MetricCheck]:
        """The checks a stage evaluates, in config order."""
        if stage.checks is None:
            return list(self.checks)
        wanted = set(stage.checks)
        return [c for c in self.checks if c.name in wanted]

    def interval_for(self, stage: CanaryStage) -> float:
        return stage.interval if stage.interval is not None else self.interval


class AlertsTLSConfig(_Model):
    """HTTPS for ``orchestrate serve``: PEM files, read at start."""

    cert_file: Path
    key_file: Path


class AlertsConfig(_Model):
    """``orchestrate serve``: the Alertmanager webhook receiver (orchestrator/server/).

    Which firing alerts roll the release back: with no ``matchers`` (the default),
    only an alert whose ``release_label`` label equals the release name; with
    ``matchers``, an alert satisfying every one ("v" equals, "~re" fully matches,
    "!v" / "!~re" negate; values are templates: $service, $namespace, $version,
    $release). Never an alert naming another release, and never one whose
    ``startsAt`` is before the release started (it is about the previous version).
    ``token``: off a loopback address at least 32 characters (``openssl rand -hex
    32``), or the receiver refuses to start. Without ``tls`` it speaks plain HTTP
    and warns off loopback. A request must arrive within ``request_timeout``; the
    state database must answer within ``state_timeout`` or the answer is 503
    (Alertmanager retries). ``max_connections`` open at once (beyond: 503),
    ``backlog`` queued connects.

    Kept here rather than in the server package: the server imports this module, and
    ReleaseConfig needs the class, so the other way round would be an import cycle.
    """

    # Which firing alerts roll the release back. With no matchers (the default) only an
    # alert whose `release_label` names this release; with matchers, every one must
    # hold: "v" equals, "~re" fully matches a regex, "!v" / "!~re" negate; values are
    # templates ($service, $namespace, $version, $release). An alert naming another
    # release never matches, and one that started before the release is ignored.
    matchers: dict[str, str] = Field(default_factory=dict)
    release_label: str = "release"
    # Alertmanager sends it as ``Authorization: Bearer <token>`` (http_config.authorization).
    # Off a loopback address it must be at least 32 characters (`openssl rand -hex 32`).
    token: SecretRef = Field(default_factory=lambda: SecretRef(env="ORCHESTRATE_WEBHOOK_TOKEN"))
    listen: str = "127.0.0.1:8080"
    # Without it, plain HTTP: the token crosses the network in clear text.
    tls: AlertsTLSConfig | None = None
    # A request (headers and body) must arrive within this, or the connection is closed.
    request_timeout: Duration = 10.0
    # Answer 503 (Alertmanager retries) when the state database has not answered in this.
    state_timeout: Duration = Field(default=4.0, gt=0, le=30)
    # Open connections at once; beyond it new requests get 503 until others finish.
    max_connections: int = Field(default=1000, ge=16)
    # The listen queue: a burst of connects must not push Alertmanager's own out.
    backlog: int = Field(default=1024, ge=128)

    @field_validator("matchers")
    @classmethod
    def _valid_regexes(cls, matchers: dict[str, str]) -> dict[str, str]:
        for label, value in matchers.items():
            parse_matcher(label, value)
        return matchers

    @field_validator("request_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not 0 < value <= 300:
            raise ValueError("request_timeout must be more than 0 and at most 5m")
        return value

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str) -> str:
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{listen!r} is not host:port (e.g. 127.0.0.1:8080, 0.0.0.0:8080)")
        return listen


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
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)

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
