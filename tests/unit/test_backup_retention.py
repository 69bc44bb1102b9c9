"""Which backups the retention count removes: only finished backups of orchestrate's
own naming, oldest first, never the one just verified."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.pg import backup


def _make(folder: Path, name: str, mtime: int, *, directory: bool = False) -> Path:
    path = folder / name
    if directory:
        path.mkdir()
        (path / "toc.dat").write_text("x")
    else:
        path.write_text("x")
    os.utime(path, (mtime, mtime))
    return path


def test_oldest_beyond_keep_go_and_the_rest_stay(tmp_path: Path) -> None:
    old = _make(tmp_path, "r1-blue.dump", 100)
    older_dir = _make(tmp_path, "r0-blue.dir", 50, directory=True)
    mid = _make(tmp_path, "r2-blue.dump", 200)
    partial = _make(tmp_path, ".r4-blue.dump.partial", 10)
    other = _make(tmp_path, "notes.dump", 5)
    # Just verified, though an odd clock gives it the oldest time: never removed.
    new = _make(tmp_path, "r3-blue.dump", 1)
    removed = backup.prune(tmp_path, 2, keep_path=new)
    assert removed == [older_dir, old]
    assert new.exists() and mid.exists() and partial.exists() and other.exists()
    assert not old.exists() and not older_dir.exists()


def test_keep_one_leaves_only_the_new_backup(tmp_path: Path) -> None:
    a = _make(tmp_path, "a-blue.dump", 100)
    b = _make(tmp_path, "b-blue.dump", 200)
    assert backup.prune(tmp_path, 1, keep_path=b) == [a]
    assert backup.backups_in(tmp_path) == [b]
