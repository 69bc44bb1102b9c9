"""Comparing a table's rows on blue and green: chunk checksums, bisection, row diffs.

1. The key space of each table is cut into ranges of about ``chunk_rows`` rows, with
   boundaries taken from a block sample of blue's keys (``TABLESAMPLE SYSTEM``: a few
   hundred random pages, never a scan and never OFFSET). Ranges are row-value
   comparisons, ``(a, b) >= (x, y) AND (a, b) < (z, w)``, so composite keys work and
   every range is an index range scan on either side.
2. Each range gets a checksum on both sides at the same time (one thread pool and
   one connection per worker per side): ``count(*)`` and the exact (numeric) sum of a
   64-bit hash of each row. A sum does not depend on the order rows are read in, so
   neither side sorts anything. The row hash is built from the type's own hash
   function where that is safe and stable across majors (integers, text, uuid,
   timestamps, jsonb, ...; the same functions hash partitioning relies on, which
   pg_upgrade keeps stable), and from the text form otherwise; see ``row_hash``.
3. A range whose checksums differ is cut into enough parts (at most
   ``split_factor``) for each to hold about ``leaf_rows`` rows; the cut points are
   computed for an integer key and read otherwise (``row_number()`` over the range
   on the side holding more rows: an index-only scan), and both sides checksum all
   parts in one query each (``bucket_query``). A part holding at most ``leaf_rows``
   rows on both sides has its rows fetched and compared by key: missing on green,
   extra on green, or which columns changed; a bigger one is cut again.
4. Every differing key found is looked up again by key on both sides before it is
   reported (``confirm``). While replication streams, that lookup follows a catch-up
   and locks the rows on the publisher, so that only real, persistent differences
   are reported (see docs/validation.md).

Collisions: two different rows get the same 64-bit hash with probability 2^-64, and
a chunk whose rows differ keeps the same (count, sum) with probability about 2^-64
too; ``strong_checksums`` adds a second, independently seeded hash (2^-128).

The package, split by job: ``queries`` builds the SQL (session settings, row
hashes, range, checksum and fetch queries), ``rows`` fetches rows and names what
differs, ``sides`` holds each side's sessions, worker pool and reads, ``confirm``
the last look at every differing key, and ``engine`` the ``Comparer`` that walks
the tables through the steps above. This module is the face: every name callers
import from ``orchestrator.pg.diff``.
"""

from __future__ import annotations

from orchestrator.pg.diff.confirm import Confirmer
from orchestrator.pg.diff.engine import Comparer, Progress, _State, compare_tables
from orchestrator.pg.diff.queries import (
    HASH_FUNCTIONS,
    SESSION_SETTINGS,
    Key,
    KeyRange,
    TablePlan,
    bucket_query,
    checksum_query,
    column_term,
    constant,
    fetch_query,
    integer_points,
    keys_predicate,
    pick_bounds,
    range_predicate,
    ranges_between,
    row_hash,
)
from orchestrator.pg.diff.rows import (
    ChunkSum,
    FetchedRow,
    RowDiff,
    TableResult,
    diff_rows,
    key_sort,
    parse_rows,
)
from orchestrator.pg.diff.sides import Conn, estimate, open_session

__all__ = [
    "HASH_FUNCTIONS",
    "SESSION_SETTINGS",
    "ChunkSum",
    "Comparer",
    "Confirmer",
    "Conn",
    "FetchedRow",
    "Key",
    "KeyRange",
    "Progress",
    "RowDiff",
    "TablePlan",
    "TableResult",
    "_State",
    "bucket_query",
    "checksum_query",
    "column_term",
    "compare_tables",
    "constant",
    "diff_rows",
    "estimate",
    "fetch_query",
    "integer_points",
    "key_sort",
    "keys_predicate",
    "open_session",
    "parse_rows",
    "pick_bounds",
    "range_predicate",
    "ranges_between",
    "row_hash",
]
