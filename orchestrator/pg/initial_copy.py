"""The initial copy's public face, kept where callers import it from.

The engine lives in the ``orchestrator.pg.copy`` package, split by job; its
docstring explains the design.
"""

from __future__ import annotations

from orchestrator.config import InitialCopyConfig
from orchestrator.pg.copy import (
    COPY_APP_PREFIX,
    FIRST_NORMAL_OID,
    SETTINGS_TABLE,
    SPLIT_GAIN,
    STATE_TABLE,
    Copier,
    CopyPlan,
    CopyState,
    CopyStats,
    CopyTask,
    ExportedSlot,
    Progress,
    SyncReport,
    TuneResult,
    copy_initial,
    copy_state,
    cores,
    default_chunk_bytes,
    effective_jobs,
    ensure_state_tables,
    exported_slot,
    initial_sync,
    lpt_makespan,
    parallel_maintenance_workers,
    plan_copy,
    restore_post_data,
    restore_sync_settings,
    split_pages,
    streaming_options,
    subscribe_from_slot,
    tune_sync_workers,
)
from orchestrator.pg.copy.pipes import Copier as _Copier

__all__ = [
    "COPY_APP_PREFIX",
    "FIRST_NORMAL_OID",
    "SETTINGS_TABLE",
    "SPLIT_GAIN",
    "STATE_TABLE",
    "Copier",
    "CopyPlan",
    "CopyState",
    "CopyStats",
    "CopyTask",
    "ExportedSlot",
    "InitialCopyConfig",
    "Progress",
    "SyncReport",
    "TuneResult",
    "_Copier",
    "copy_initial",
    "copy_state",
    "cores",
    "default_chunk_bytes",
    "effective_jobs",
    "ensure_state_tables",
    "exported_slot",
    "initial_sync",
    "lpt_makespan",
    "parallel_maintenance_workers",
    "plan_copy",
    "restore_post_data",
    "restore_sync_settings",
    "split_pages",
    "streaming_options",
    "subscribe_from_slot",
    "tune_sync_workers",
]
