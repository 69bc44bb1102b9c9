"""What a release records about itself: its state, its status, and its facts.

One definition, one parser, one serialiser (after kopf's ``HandlerState``): the rest
of orchestrate reads and writes these types, never the JSON of the ``releases`` row.

- ``State``: where the state machine is (``releases.state``).
- ``Status``: how the release stands (``releases.status``, checked by the table).
- ``Facts``: what the states learned (``releases.facts``): the backup, the mode, the
  weights last set, whether green took writes... A fact that was never set is not
  stored at all (not stored as null or a default), so a later state can tell "not
  yet" from "no": ``Facts.from_storage`` and ``Facts.for_storage`` keep the JSON
  exactly as it was written, key order included (``orchestrate status --output
  json`` prints it).

Unknown facts (a key this version does not define) are kept, not refused: they are
set aside in ``Facts.extra`` on load and written back unchanged by ``for_storage``.
A row is read by more than the version that wrote it: ``orchestrate status``,
``rollback`` or ``abort`` run by a different release of orchestrate (an older CLI
on an operator's laptop, a newer receiver) must still work on it, and refusing the
row would leave a release that cannot even be rolled back. Ignoring them is safe for
the decisions this version takes: what a rollback must undo is read from facts
every version writes (``green_writable``, ``switched_over``, ``blue_fenced``), and
``merge_facts`` updates the row key by key in SQL, so a fact this version does not
know is never overwritten. A known fact with a value of the wrong type is refused
(``RecordError``): guessing there could undo the wrong thing.

Timestamps stay seconds since the epoch (``EpochSeconds``, what ``time.time()``
gives) rather than ``datetime``: a ``datetime`` holds microseconds, and turning the
floats today's rows hold into one and back would not give the same number.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from orchestrator.config import ReleaseConfig
from orchestrator.errors import OrchestrateError
from orchestrator.pg.backup import BackupResult
from orchestrator.routers.base import Weights


class State(StrEnum):
    PREFLIGHT = "preflight"
    BACKUP = "backup"
    PROVISION = "provision"
    MIGRATE = "migrate"
    SYNC = "sync"
    VALIDATE = "validate"
    CANARY = "canary"
    PROMOTE = "promote"
    WINDOW = "window"
    CLEANUP = "cleanup"
    DONE = "done"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class Status(StrEnum):
    """The values the ``releases.status`` CHECK constraint allows."""

    RUNNING = "running"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


TERMINAL = frozenset({State.DONE, State.ROLLED_BACK, State.FAILED})
# States whose failure leaves the release promoted: retry them, never roll back.
AFTER_PROMOTION = frozenset({State.WINDOW, State.CLEANUP})
# States from which no rollback can start: past the window, or already over.
NO_ROLLBACK_FROM = (State.CLEANUP, State.DONE, State.ROLLED_BACK, State.FAILED)

Mode = Literal["bidirectional", "switchover"]
# Seconds since the epoch, as time.time() gives them.
EpochSeconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class RecordError(OrchestrateError):
    """A release row this version of orchestrate cannot read."""


def parse_state(name: str, value: str) -> State:
    return _parse(State, name, value, "is in state")


def parse_status(name: str, value: str) -> Status:
    return _parse(Status, name, value, "has status")


_E = TypeVar("_E", State, Status)


def _parse(kind: type[_E], name: str, value: str, says: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise RecordError(
            f"release {name} {says} {value!r}, which this version of orchestrate "
            "does not know",
            hint="run the orchestrate version that started the release") from None


class _Stored(BaseModel):
    """A model that writes back the keys it was read from in the order they came:
    PostgreSQL's jsonb has its own key order, and that is the order printed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        made = handler(data)
        if isinstance(data, Mapping) and isinstance(made, _Stored):
            made._order = tuple(data)
        return made

    @model_serializer(mode="wrap")
    def _in_stored_order(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        first = {k: out[k] for k in self._order if k in out}
        return {**first, **out}


class BackupFact(_Stored, BackupResult):
    """``backup.BackupResult`` as recorded (its fields are that model's). Keys a newer
    version adds are kept (see the module's docstring), like the unknown facts."""

    model_config = ConfigDict(extra="allow")


class Facts(_Stored):
    """What the states learned. Reports a person reads (``sync``, ``validation``,
    ``matviews_refreshed``) are kept as their modules produce them: orchestrate
    never decides anything from them."""

    mode: Mode | None = None
    majors: dict[str, int] | None = None
    backup: BackupFact | None = None
    blue_fingerprint: dict[str, str] | None = None
    migrations: list[str] | None = None
    sync: dict[str, Any] | None = None
    matviews_refreshed: list[dict[str, Any]] | None = None
    validation: dict[str, Any] | None = None
    # Canary stages done (the next one to run), and the stage paused for a person.
    stage: int = 0
    awaiting_approval: int | None = None
    weights_target: Weights | None = None  # set before the router is asked
    weights: Weights | None = None  # what the router reported after the change
    green_writable: bool = False
    blue_fenced: bool = False
    switched_over: bool = False
    switchover_pause_s: float | None = None
    forward_dropped: bool = False
    promoted_at: EpochSeconds | None = None
    rollback_reason: str | None = None
    rollback_from: State | None = None
    rolled_back_at: EpochSeconds | None = None

    _extra: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def extra(self) -> dict[str, Any]:
        """Stored facts this version does not define, written back as they were."""
        return dict(self._extra)

    def window_closes(self, window: float) -> float | None:
        """When the rollback window closes (``rollback.window`` after the promotion);
        None before the release was promoted."""
        return None if self.promoted_at is None else self.promoted_at + window

    @classmethod
    def from_storage(cls, stored: Mapping[str, Any], *, release: str = "") -> Facts:
        known = {k: v for k, v in stored.items() if k in cls.model_fields}
        try:
            facts = cls.model_validate(known)
        except ValidationError as exc:
            where = f"release {release}" if release else "the release"
            raise RecordError(
                f"the facts recorded for {where} do not read: "
                + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                            for e in exc.errors()),
                hint="run the orchestrate version that started the release") from exc
        facts._order = tuple(stored)
        facts._extra = {k: v for k, v in stored.items() if k not in cls.model_fields}
        return facts

    def for_storage(self) -> dict[str, Any]:
        """The facts set (explicitly, null included), as JSON, in their stored order."""
        out = self.model_dump(mode="json", exclude_unset=True)
        merged = {**out, **self._extra}
        first = {k: merged[k] for k in self._order if k in merged}
        return {**first, **merged}


@dataclass(frozen=True)
class Pause:
    """Not a failure: the release stops here for now (the rollback window is still
    open) and the next run continues from the same state."""

    message: str


@dataclass(frozen=True)
class Outcome:
    name: str
    state: State
    status: Status
    error: str | None

    @property
    def exit_code(self) -> int:
        if self.status == Status.PROMOTED:
            return 0
        return 1


def config_digest(cfg: ReleaseConfig) -> tuple[str, dict[str, Any]]:
    """The config as stored with the release (secrets are references, never values),
    and a hash of what the user wrote: defaults are left out of the hash, so that an
    upgrade of orchestrate that adds a setting does not block resuming a release."""
    data = json.loads(cfg.model_dump_json(by_alias=True))
    written = json.loads(cfg.model_dump_json(by_alias=True, exclude_unset=True))
    text = json.dumps(written, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), data
