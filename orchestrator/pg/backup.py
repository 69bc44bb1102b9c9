"""Backing up blue: pg_dump in a restorable format, checksummed, verified.

The file is written under a temporary name and renamed only once pg_restore has
listed it and every table's data is in its table of contents, so a file with the
final name is always a complete, readable backup. The checksum recorded with the
release lets a resumed run trust the file instead of dumping again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import BackupConfig, DatabaseConfig
from orchestrator.errors import ReleaseFailed
from orchestrator.pg.tools import PgTools, run_tool


@dataclass(frozen=True)
class BackupResult:
    path: str
    format: str
    sha256: str
    bytes: int
    seconds: float
    toc_entries: int
    tables_with_data: int

    def as_fact(self) -> dict[str, Any]:
        return asdict(self)


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


def verify(path: Path, tools: PgTools, db: DatabaseConfig, tables: list[str]) -> tuple[int, int]:
    """pg_restore --list reads the whole table of contents; every table must have data."""
    listing = run_tool([tools.path("pg_restore"), "--list", str(path)], db, timeout=300,
                       what="pg_restore --list")
    entries = [ln for ln in listing.splitlines() if ln and not ln.startswith(";")]
    with_data = {" ".join(ln.split()[-3:-1]) for ln in entries if " TABLE DATA " in ln}
    missing = [t for t in tables if " ".join(t.split(".", 1)) not in with_data]
    if missing:
        raise ReleaseFailed(f"backup {path.name} lacks the data of {', '.join(missing[:5])}",
                            hint="check pg_dump's permissions on those tables")
    return len(entries), len(with_data)


def backup(db: DatabaseConfig, tools: PgTools, cfg: BackupConfig, *, release: str,
           tables: list[str], previous: dict[str, Any] | None = None) -> BackupResult:
    """Dump blue unless a verified backup of this release already exists."""
    cfg.dir.mkdir(parents=True, exist_ok=True)
    suffix = ".dump" if cfg.format == "custom" else ".dir"
    final = cfg.dir / f"{release}-blue{suffix}"
    if previous and Path(previous["path"]) == final and final.exists():
        digest, size = _sha256(final)
        if digest == previous["sha256"]:
            return BackupResult(**{**previous, "seconds": 0.0})
    tmp = cfg.dir / f".{release}-blue{suffix}.partial"
    if tmp.is_dir():
        shutil.rmtree(tmp)
    else:
        tmp.unlink(missing_ok=True)
    cmd = [tools.path("pg_dump"), "--format", cfg.format, "--file", str(tmp),
           "--dbname", db.conninfo(with_password=False), "--no-sync"]
    if cfg.format == "directory":
        cmd += ["--jobs", str(cfg.jobs)]
    started = time.monotonic()
    run_tool(cmd, db, timeout=cfg.timeout, what="pg_dump of blue",
             timeout_hint="raise backup.timeout")
    seconds = time.monotonic() - started
    toc, with_data = verify(tmp, tools, db, tables)
    # fsync before the rename: --no-sync saved time during the dump, but a backup that a
    # power cut can truncate is not a backup.
    _fsync_tree(tmp)
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)
    digest, size = _sha256(final)
    return BackupResult(str(final), cfg.format, digest, size, round(seconds, 3), toc, with_data)


def _fsync_tree(path: Path) -> None:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
