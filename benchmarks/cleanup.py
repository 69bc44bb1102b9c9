"""What every benchmark does when it ends, passed or failed: stop its clusters and
remove their directory, unless ``--keep`` asked to keep it for a look."""

from __future__ import annotations

import shutil
from pathlib import Path

from orchestrator.sandbox.pgcluster import PgCluster


def stop_and_clean(base: Path, keep: bool, *clusters: PgCluster) -> None:
    for cluster in clusters:
        cluster.stop()
    if keep:
        print(f"kept {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
