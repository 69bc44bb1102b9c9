"""The release's name when the config gives none (``release.name`` left out).

A CronJob runs the same config every time, so the name cannot be in the config. The
rules, in order (docs/recurring.md):

1. a release that is not over yet (running, or promoted and waiting for its window
   to close) is the one this run continues: its name, whatever it is. A rerun after
   a crash or a killed Job therefore resumes, and the digest check of the resume
   still refuses a changed config;
2. otherwise ``<service>-<version>`` (``release.service``, ``release.version``), the
   first time that version is released;
3. when a release of that name exists and is over (the version did not change), the
   same with the UTC time appended: ``<service>-<version>-20260105t030000z``.

Names follow the ``Name`` rule (lower case, digits, ``-`` and ``_``, at most 48
characters): other characters become ``-``, and a name too long is cut with a short
hash of the whole, so that two long versions never share a name.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime

from orchestrator.config import ReleaseConfig
from orchestrator.store import StateStore

MAX_NAME = 48
_STAMP = "%Y%m%dt%H%M%Sz"


def slug(text: str, limit: int = MAX_NAME) -> str:
    """``text`` as a valid release name of at most ``limit`` characters."""
    plain = re.sub(r"[^a-z0-9_-]+", "-", text.lower())
    plain = re.sub(r"-{2,}", "-", plain).strip("-_") or "release"
    if len(plain) <= limit:
        return plain
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{plain[:limit - 9].rstrip('-_')}-{digest}"


def base_name(cfg: ReleaseConfig) -> str:
    return slug(f"{cfg.release.service}-{cfg.release.version}")


def stamped(base: str, now: datetime) -> str:
    stamp = now.astimezone(UTC).strftime(_STAMP)
    return f"{slug(base, MAX_NAME - len(stamp) - 1)}-{stamp}"


def release_name(cfg: ReleaseConfig, store: StateStore, *, starting: bool,
                 now: datetime | None = None) -> str:
    """The name this run uses. ``starting``: the command may start a new release
    (``orchestrate release``); otherwise (status, rollback, promote, serve) the name
    is that of the release the command is about: the unfinished one, else the latest."""
    if cfg.release.name:
        return cfg.release.name
    unfinished = store.unfinished()
    if unfinished is not None:
        return unfinished.name
    base = base_name(cfg)
    if not starting:
        latest = store.latest()
        return latest.name if latest is not None else base
    if store.get(base) is None:
        return base
    return stamped(base, now or datetime.now(UTC))
