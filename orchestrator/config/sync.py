"""``sync``: logical replication from blue to green and its initial copy."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from orchestrator.config._base import Duration, _Model
from orchestrator.pg.names import parse_qualified


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
    # Replication lag a canary stage tolerates, in each direction that runs: WAL the
    # subscriber has not confirmed, and how old the last change it applied is. Over
    # either limit for ``lag_failure_limit`` data-path checks in a row (one per stage
    # interval) fails the stage: a lagging green serves stale reads, and a lagging
    # reverse path makes a rollback slow. Seconds are replay_lag, or how long the slot's
    # confirmed position stood still while WAL waited: keep the limit above the
    # subscriber's status interval (wal_receiver_status_interval, 10 s by default),
    # or a quiet path with other WAL on the server reads as stuck.
    max_lag_bytes: int = Field(default=1024 * 1024, ge=0)
    max_lag_seconds: Duration = 30.0
    lag_failure_limit: int = Field(default=3, ge=1)
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
