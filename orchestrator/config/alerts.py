"""``alerts``: the Alertmanager webhook receiver of ``orchestrate serve``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from orchestrator.config._base import Duration, SecretRef, _Model
from orchestrator.matchers import parse_matcher


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
