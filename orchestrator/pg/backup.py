"""Backing up blue: pg_dump in a restorable format, checksummed, verified, private.

The dump is written under a temporary name in the backup folder and renamed only
once pg_restore has listed it and the data of every table the release copies is in
its table of contents, so a file with the final name is always a complete, readable
backup. A dump that fails or is interrupted is deleted; one left by a killed run is
deleted by the next before it dumps again. The checksum recorded with the release
lets a resumed run trust the file instead of dumping again.

A backup is a full copy of blue, so nobody else on the machine may read it:

- the folder is created 0700; an existing folder of ours that is open to others is
  tightened to 0700 (it is orchestrate's backup folder by configuration). A folder
  we do not own cannot be tightened: that is how container volumes are mounted
  (a root-owned emptyDir or claim with the pod's fsGroup), so it is used, with a
  warning, because the dump itself is private;
- the dump is created 0600 (a directory-format dump 0700, its files 0600) at
  creation: the custom-format file is opened by orchestrate with O_EXCL and
  O_NOFOLLOW and handed to pg_dump as its stdout, and pg_dump runs with umask 077.

Verification is against blue's catalog, not against names parsed from text:
``pg_restore --list`` prints names unquoted (``"c d"."a b"`` and ``c."d a b"``
print the same line), but each ``TABLE DATA`` entry carries the table's OID
(``<id>; 0 <oid> TABLE DATA ...``). A partitioned table holds no rows itself: its
data is in its leaf partitions, each with an entry of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict

from orchestrator.config import BackupConfig
from orchestrator.errors import ReleaseFailed
from orchestrator.logging import get_logger
from orchestrator.pg.catalog import Table
from orchestrator.pg.endpoint import Endpoint, EndpointLike
from orchestrator.pg.tools import PgTools, run_tool

log = get_logger("orchestrate")

# A TOC line; names and owners are printed with newlines turned into spaces, so
# every entry is one line, and the OID is the table's.
_TABLE_DATA = re.compile(r"^\d+; 0 (\d+) TABLE DATA ", re.MULTILINE)


class BackupResult(BaseModel):
    """A verified dump of blue. ``record.BackupFact`` stores it with these fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    format: str
    sha256: str
    bytes: int
    seconds: float
    toc_entries: int
    tables_with_data: int

    def as_fact(self) -> dict[str, Any]:
        return self.model_dump()


@dataclass(frozen=True)
class TableData:
    """A relation whose rows the dump must hold: a table, or a leaf partition of one."""

    oid: int
    schema: str
    name: str
    table: tuple[str, str]  # the copied table it belongs to (itself if not partitioned)

    def describe(self) -> str:
        own = _show(self.schema, self.name)
        if (self.schema, self.name) == self.table:
            return own
        return f"{own} (partition of {_show(*self.table)})"


def _show(schema: str, name: str) -> str:
    return sql.Identifier(schema, name).as_string(None)


def expected_data(conn: psycopg.Connection[Any],
                  tables: Iterable[Table | tuple[str, str]]) -> list[TableData]:
    """What must have data in a dump of blue: each plain table the release copies, and
    each leaf partition (at any depth, the default one included) of a partitioned one.

    Foreign-table partitions are left out: pg_dump never dumps their rows.
    """
    names = [(t.schema, t.name) if isinstance(t, Table) else t for t in tables]
    rows = conn.execute(
        """
        SELECT c.oid, n.nspname, c.relname, q.s, q.r
        FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS q(s, r, ord)
        JOIN pg_namespace qn ON qn.nspname = q.s
        JOIN pg_class qc ON qc.relnamespace = qn.oid AND qc.relname = q.r
        CROSS JOIN LATERAL (
            SELECT qc.oid AS relid WHERE qc.relkind = 'r'
            UNION ALL  -- pg_partition_tree() is empty for a table outside any tree
            SELECT t.relid FROM pg_partition_tree(qc.oid) t
            WHERE qc.relkind = 'p' AND t.isleaf) l
        JOIN pg_class c ON c.oid = l.relid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r'
        ORDER BY q.ord, n.nspname, c.relname
        """,
        ([s for s, _ in names], [r for _, r in names]),
    ).fetchall()
    seen: dict[int, TableData] = {}
    for oid, schema, name, root_schema, root_name in rows:
        seen.setdefault(int(oid), TableData(int(oid), schema, name, (root_schema, root_name)))
    return list(seen.values())


def verify(path: Path, tools: PgTools, db: EndpointLike,
           expected: Sequence[TableData]) -> tuple[int, int]:
    """pg_restore --list reads the whole table of contents; every expected relation
    must have its TABLE DATA entry. Returns (TOC entries, TABLE DATA entries)."""
    db = Endpoint.of(db, "blue")
    listing = run_tool([tools.path("pg_restore"), "--list", str(path)], db, timeout=300,
                       what="pg_restore --list")
    entries = [ln for ln in listing.splitlines() if ln and not ln.startswith(";")]
    with_data = {int(oid) for oid in _TABLE_DATA.findall(listing)}
    missing = [t for t in expected if t.oid not in with_data]
    if missing:
        shown = ", ".join(t.describe() for t in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ReleaseFailed(
            f"the backup of {db.describe()} lacks the data of {shown}{more}",
            # pg_dump fails outright on a table it may not read; a dump that
            # succeeded without a table's rows was taken of a different set of
            # tables than the release copies.
            hint="pg_dump succeeded, so this is not a permission problem: those tables "
            "were most likely created, dropped, attached or detached on blue while the "
            "backup ran. Run the release again without schema changes on blue")
    return len(entries), len(with_data)


def _private_folder(folder: Path) -> None:
    """The backup folder, readable by nobody else (see the module docstring)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, or no right to create it
        raise ReleaseFailed(f"cannot use {folder} as the backup folder: {exc.strerror}",
                            hint="set backup.dir to a folder orchestrate may create or "
                            "write") from exc
    st = folder.stat()
    mode = stat.S_IMODE(st.st_mode)
    if mode == 0o700:
        return
    if st.st_uid == os.geteuid():
        os.chmod(folder, 0o700)
        if mode & 0o077:
            log.warning("backup folder was open to other users: tightened", folder=str(folder),
                        was=f"{mode:04o}", now="0700")
        return
    if mode & 0o077:
        log.warning("backup folder is open to other users and not ours to tighten; the "
                    "dump itself is private (0600)", folder=str(folder), mode=f"{mode:04o}",
                    owner=st.st_uid)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def backup(db: EndpointLike, tools: PgTools, cfg: BackupConfig, *,
           release: str, tables: Sequence[TableData], previous: dict[str, Any] | None = None
           ) -> BackupResult:
    """Dump blue unless a verified backup of this release already exists."""
    db = Endpoint.of(db, "blue")
    _private_folder(cfg.dir)
    suffix = ".dump" if cfg.format == "custom" else ".dir"
    final = cfg.dir / f"{release}-blue{suffix}"
    if previous and Path(previous["path"]) == final and final.exists():
        digest, size = _sha256(final)
        if digest == previous["sha256"]:
            return BackupResult.model_validate({**previous, "seconds": 0.0})
    tmp = cfg.dir / f".{release}-blue{suffix}.partial"
    _remove(tmp)  # left by a run that was killed while dumping
    started = time.monotonic()
    try:
        _dump(db, tools, cfg, tmp)
        seconds = time.monotonic() - started
        toc, with_data = verify(tmp, tools, db, tables)
        if final.is_dir() or cfg.format == "directory":
            _remove(final)  # a file replaces a file atomically, a folder cannot
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):  # the reason it failed matters more
            _remove(tmp)
        raise
    _fsync_path(cfg.dir)  # the rename is durable only once the folder is synced
    digest, size = _sha256(final)
    if cfg.keep is not None:
        prune(cfg.dir, cfg.keep, keep_path=final)
    return BackupResult(path=str(final), format=cfg.format, sha256=digest, bytes=size,
                        seconds=round(seconds, 3), toc_entries=toc, tables_with_data=with_data)


def backups_in(folder: Path) -> list[Path]:
    """The finished backups in ``folder``, oldest first: ``<release>-blue.dump`` files
    and ``<release>-blue.dir`` folders (never a ``.partial`` one, nor anything else)."""
    found = [p for p in folder.iterdir() if not p.name.startswith(".")
             and not p.is_symlink()
             and ((p.is_file() and p.name.endswith("-blue.dump"))
                  or (p.is_dir() and p.name.endswith("-blue.dir")))]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def prune(folder: Path, keep: int, *, keep_path: Path) -> list[Path]:
    """Remove the oldest backups beyond the newest ``keep``; ``keep_path`` (the backup
    just verified) is never removed. Called only after a new backup was verified, so
    a failed dump never costs an old one. Returns what was removed."""
    others = [p for p in backups_in(folder) if p != keep_path]
    doomed = others[:max(0, len(others) - (keep - 1))]
    for path in doomed:
        _remove(path)
        log.info("old backup removed", path=str(path), keep=keep)
    if doomed:
        _fsync_path(folder)
    return doomed


def _dump(db: Endpoint, tools: PgTools, cfg: BackupConfig, tmp: Path) -> None:
    """pg_dump into ``tmp``, private from creation and on disk when this returns."""
    cmd = [tools.path("pg_dump"), "--format", cfg.format,
           "--dbname", db.tool_conninfo(), "--no-sync"]
    what, hint = "pg_dump of blue", "raise backup.timeout"
    # fsync by orchestrate after the dump: --no-sync saved time during it, but a backup
    # that a power cut can truncate is not a backup.
    if cfg.format == "directory":
        cmd += ["--jobs", str(cfg.jobs), "--file", str(tmp)]
        run_tool(cmd, db, timeout=cfg.timeout, what=what, timeout_hint=hint)
        _fsync_tree(tmp)
        return
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        # A regular file as stdout is seekable, so the archive gets its data offsets
        # (parallel pg_restore works) exactly as with --file.
        run_tool(cmd, db, timeout=cfg.timeout, what=what, timeout_hint=hint, stdout=fd)
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
                total += len(chunk)
    return digest.hexdigest(), total


def _fsync_tree(path: Path) -> None:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for f in files:
        _fsync_path(f)
    if path.is_dir():
        _fsync_path(path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

