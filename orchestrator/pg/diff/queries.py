"""The SQL of a comparison: session settings, row hashes, range and checksum queries.

Pure builders: nothing here talks to a server. ``rows`` runs the fetching queries
and compares what comes back; ``engine`` runs the checksums and decides what to
look at next.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from psycopg import sql

from orchestrator.pg.columns import ColumnPair, Side
from orchestrator.pg.names import QualifiedName

Key = tuple[str, ...]  # a row's key, each column in its text form

# Pinned on every comparing session, so that text forms are identical on both sides
# whatever the server or role defaults are, and on every major from 12 on:
# extra_float_digits > 0 gives the shortest exact float text (12+), TimeZone fixes
# timestamptz text, and so on. search_path keeps every name we do not qualify in
# pg_catalog (no user function can shadow ours). JIT compiling a short range query
# costs more than it saves; parallel query would compete with our own workers.
SESSION_SETTINGS: tuple[tuple[str, str], ...] = (
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
    ("xmlbinary", "base64"),
    ("lc_monetary", "C"),
    ("search_path", "pg_catalog, pg_temp"),
    ("jit", "off"),
    ("max_parallel_workers_per_gather", "0"),
)

# Built-in base types hashed by their own hash function rather than by text, with how
# the argument is passed. Only types whose hash depends on the value alone: enums
# (label OIDs differ between the two databases), numeric and interval (1.0 and 1.00,
# '1 day' and '24 hours' hash the same but read differently) and everything else go
# through the text form. Text types are hashed with COLLATE "C" (the bytes), whatever
# the column's collation is.
HASH_FUNCTIONS: dict[str, tuple[str, str]] = {
    "int2": ("hashint2extended", ""),
    "int4": ("hashint4extended", ""),
    "int8": ("hashint8extended", ""),
    "float4": ("hashfloat4extended", ""),
    "float8": ("hashfloat8extended", ""),
    "bool": ("hashint4extended", "int4"),
    "text": ("hashtextextended", "collate"),
    "varchar": ("hashtextextended", "collate"),
    "bpchar": ("hashbpcharextended", "collate"),
    "uuid": ("uuid_hash_extended", ""),
    "date": ("hashtextextended", "text"),
    "time": ("time_hash_extended", ""),
    "timestamp": ("timestamp_hash_extended", ""),
    "timestamptz": ("timestamp_hash_extended", "utc"),
    "jsonb": ("jsonb_hash_extended", ""),
    "inet": ("hashinetextended", ""),
    "cidr": ("hashinetextended", ""),
    "macaddr": ("hashmacaddrextended", ""),
    "macaddr8": ("hashmacaddr8extended", ""),
    "pg_lsn": ("pg_lsn_hash_extended", ""),
}

_MASK64 = (1 << 64) - 1


def constant(*parts: int) -> int:
    """A fixed pseudo-random signed 64-bit constant (splitmix64 of ``parts``): seeds."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x + (p + 1) * 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x - (1 << 64) if x >= (1 << 63) else x


# ---------------------------------------------------------------- plans and SQL


@dataclass(frozen=True)
class KeyRange:
    """Keys >= lo and < hi (None: unbounded), compared as row values."""

    lo: Key | None = None
    hi: Key | None = None

    def describe(self, names: Sequence[str]) -> str:
        def show(k: Key) -> str:
            return ", ".join(f"{n}={v}" for n, v in zip(names, k, strict=False))
        lo = f"[{show(self.lo)}" if self.lo is not None else "(start"
        hi = f"{show(self.hi)})" if self.hi is not None else "end)"
        return f"{lo} .. {hi}"


@dataclass
class TablePlan:
    table: QualifiedName  # the same on both sides
    columns: list[ColumnPair]  # compared, in blue's order
    key: list[ColumnPair]  # empty: no usable key, the table is compared whole
    green_only: list[str] = field(default_factory=list)
    est_rows: int = 0
    pages: int = 0

    @property
    def chunked(self) -> bool:
        return bool(self.key)

    @property
    def key_names(self) -> list[str]:
        return [k.blue for k in self.key]


def _ids(pairs: Iterable[ColumnPair], side: Side) -> list[sql.Composable]:
    return [sql.Identifier(p.name(side)) for p in pairs]


def _row(items: Sequence[sql.Composable]) -> sql.Composable:
    joined = sql.SQL(", ").join(items)
    return joined if len(items) == 1 else sql.SQL("({})").format(joined)


def _aliased(items: Sequence[sql.Composable]) -> sql.Composable:
    """A select list with positional aliases.

    ``SELECT CAST(id AS text) ... ORDER BY id`` would sort by the *output* column
    (named id too), i.e. as text: the aliases keep ORDER BY on the real columns.
    """
    return sql.SQL(", ").join(sql.SQL("{} AS {}").format(item, sql.Identifier(f"orch_c{i}"))
                              for i, item in enumerate(items))


def range_predicate(plan: TablePlan, side: Side, rng: KeyRange
                    ) -> tuple[sql.Composable, list[str]]:
    """WHERE text and parameters for ``rng`` (TRUE when unbounded).

    Bounds travel as text parameters of unknown type, so that each server reads them
    as its own key column type (int4 on one side and int8 on the other is fine), and
    the comparison stays an index condition.
    """
    target = _row(_ids(plan.key, side))
    parts: list[sql.Composable] = []
    params: list[str] = []
    for bound, op in ((rng.lo, ">="), (rng.hi, "<")):
        if bound is not None:
            parts.append(sql.SQL("{} {} {}").format(
                target, sql.SQL(op), _row([sql.Placeholder()] * len(bound))))
            params += bound
    return (sql.SQL(" AND ").join(parts) if parts else sql.SQL("TRUE")), params


def keys_predicate(plan: TablePlan, side: Side, keys: Sequence[Key]
                   ) -> tuple[sql.Composable, list[str]]:
    target = _row(_ids(plan.key, side))
    one = _row([sql.Placeholder()] * len(plan.key))
    values = sql.SQL(", ").join([one] * len(keys))
    return (sql.SQL("{} IN ({})").format(target, values),
            [v for k in keys for v in k])


# Stand-ins for NULL where the row hash chains columns (see ``row_hash``): any value
# of the type does, the NULL flag goes into the seed.
_NULL_STANDIN: dict[str, str] = {
    "int2": "0", "int4": "0", "int8": "0", "float4": "0", "float8": "0", "bool": "0",
    "text": "", "varchar": "", "bpchar": "", "uuid": "00000000-0000-0000-0000-000000000000",
    "time": "00:00", "timestamp": "epoch", "timestamptz": "epoch", "jsonb": "null",
    "inet": "0.0.0.0", "cidr": "0.0.0.0",  # noqa: S104 (values, not addresses to bind)
    "macaddr": "00:00:00:00:00:00",
    "macaddr8": "00:00:00:00:00:00:00:00", "pg_lsn": "0/0",
}
# Columns chained in one nested expression; wider tables are hashed in groups (the
# server's expression depth is limited).
_CHAIN = 32


def _hash_call(pair: ColumnPair, side: Side, seed: sql.Composable, *, standin: bool
               ) -> sql.Composable:
    """``fn(column, seed)``: the column's own hash function, or its text form's.

    With ``standin`` NULL is replaced by a value of the type (the caller records the
    NULL elsewhere), so the call never returns NULL.
    """
    col: sql.Composable = sql.Identifier(pair.name(side))
    fn, how = HASH_FUNCTIONS.get(pair.base, ("hashtextextended", "text"))
    if how == "text":
        arg: sql.Composable = sql.SQL("CAST({} AS pg_catalog.text)").format(col)
    elif how == "int4":
        arg = sql.SQL("CAST({} AS pg_catalog.int4)").format(col)
    elif how == "utc":
        # The instant, not its rendering in some time zone.
        arg = sql.SQL("({} AT TIME ZONE 'UTC')").format(col)
    else:
        arg = col
    if standin:
        arg = sql.SQL("COALESCE({}, {})").format(
            arg, sql.Literal(_NULL_STANDIN.get(pair.base if how != "text" else "text", "")))
    if how in ("text", "collate"):
        arg = sql.SQL('{} COLLATE "C"').format(arg)
    return sql.SQL("pg_catalog.{}({}, {})").format(sql.Identifier(fn), arg, seed)


def column_term(pair: ColumnPair, side: Side, position: int, variant: int = 0
                ) -> sql.Composable:
    """The 64-bit hash of one column of a row on its own, never NULL.

    Used to tell which columns of a differing row differ. NULL maps to a
    per-position constant, so NULL and '' hash apart.
    """
    term = _hash_call(pair, side, sql.Literal(constant(variant, position, 1)), standin=False)
    if pair.nullable:
        term = sql.SQL("COALESCE({}, {})").format(term, sql.Literal(constant(variant, position, 2)))
    return term


def row_hash(plan: TablePlan, side: Side, variant: int = 0) -> sql.Composable:
    """A 64-bit hash of the compared columns of a row.

    Columns are chained: each column's hash function takes the previous column's
    hash as its seed, so the result depends on every value and on its position, with
    one function call per column (cheaper than hashing each column apart and mixing
    the results, and much cheaper than hashing the row's text). A nullable column
    hashes a stand-in value and flips the seed with a per-position constant when
    NULL, so NULL, '' and 0 all hash apart. Groups of columns (wide tables) are
    XORed and mixed once more: a bare XOR of independent hashes, summed over rows,
    would let values swapped between two rows cancel out.
    """
    groups: list[sql.Composable] = []
    for g in range(0, max(len(plan.columns), 1), _CHAIN):
        h: sql.Composable = sql.Literal(constant(variant, g, 3))
        for i, pair in enumerate(plan.columns[g:g + _CHAIN], start=g):
            if pair.nullable:
                h = sql.SQL("({} # CASE WHEN {} IS NULL THEN {} ELSE 0 END)").format(
                    h, sql.Identifier(pair.name(side)), sql.Literal(constant(variant, i, 4)))
            h = _hash_call(pair, side, h, standin=pair.nullable)
        groups.append(h)
    if len(groups) == 1:
        return groups[0]
    return sql.SQL("pg_catalog.hashint8extended({}, {})").format(
        sql.SQL(" # ").join(groups), sql.Literal(constant(variant, 1 << 20)))


def checksum_query(plan: TablePlan, side: Side, rng: KeyRange, *, strong: bool,
                   counts_only: bool = False) -> tuple[sql.Composed, list[str]]:
    where, params = range_predicate(plan, side, rng) if plan.chunked else (sql.SQL("TRUE"), [])
    if counts_only:
        sums: list[sql.Composable] = []
    else:
        sums = [sql.SQL("pg_catalog.sum({})::pg_catalog.text").format(row_hash(plan, side, v))
                for v in range(2 if strong else 1)]
    return sql.SQL("SELECT {} FROM {} WHERE {}").format(
        sql.SQL(", ").join([sql.SQL("count(*)"), *sums]), plan.table.ident, where), params


def _part_of(target: sql.Composable, points: Sequence[Key], first: int,
             params: list[str]) -> sql.Composable:
    """A CASE tree giving the part number of ``target``: log2(len(points)) comparisons."""
    if not points:
        return sql.Literal(first)
    mid = len(points) // 2
    params += points[mid]
    below = _part_of(target, points[:mid], first, params)
    above = _part_of(target, points[mid + 1:], first + mid + 1, params)
    return sql.SQL("CASE WHEN {} < {} THEN {} ELSE {} END").format(
        target, _row([sql.Placeholder()] * len(points[mid])), below, above)


def bucket_query(plan: TablePlan, side: Side, rng: KeyRange, points: Sequence[Key], *,
                 strong: bool) -> tuple[sql.Composed, list[str]]:
    """Checksums of the parts of ``rng`` cut at ``points``, in one pass over the range.

    Part i holds the keys in [points[i-1], points[i]). A balanced tree of row
    comparisons assigns each row its part: it works for composite keys (unlike
    width_bucket) and costs about 8 comparisons per row for 256 parts.
    """
    bucket_params: list[str] = []
    bucket = _part_of(_row(_ids(plan.key, side)), points, 0, bucket_params)
    where, params = range_predicate(plan, side, rng)
    sums = [sql.SQL("pg_catalog.sum({})::pg_catalog.text").format(row_hash(plan, side, v))
            for v in range(2 if strong else 1)]
    query = sql.SQL("SELECT {} AS orch_part, count(*), {} FROM {} WHERE {} GROUP BY 1").format(
        bucket, sql.SQL(", ").join(sums), plan.table.ident, where)
    return query, bucket_params + params


def integer_points(lo: int, hi: int, parts: int) -> list[Key]:
    """Points cutting the integers [lo, hi) into ``parts`` ranges of equal width."""
    width = hi - lo
    if width <= 1:
        return []
    parts = min(parts, width)
    points = sorted({lo + (width * i) // parts for i in range(1, parts)})
    return [(str(p),) for p in points if lo < p < hi]


def fetch_query(plan: TablePlan, side: Side, where: sql.Composable, *, limit: int | None,
                lock: bool) -> sql.Composed:
    """Rows with their key text, the per-column hash terms and the values as text."""
    key_text = [sql.SQL("CAST({} AS pg_catalog.text)").format(c) for c in _ids(plan.key, side)]
    terms = [column_term(p, side, i) for i, p in enumerate(plan.columns)]
    texts = [sql.SQL("CAST({} AS pg_catalog.text)").format(c) for c in _ids(plan.columns, side)]
    query = sql.SQL("SELECT {} FROM {} WHERE {}").format(
        _aliased([*key_text, *terms, *texts]), plan.table.ident, where)
    if plan.key:
        query = sql.SQL("{} ORDER BY {}").format(query, sql.SQL(", ").join(_ids(plan.key, side)))
    if limit is not None:
        query = sql.SQL("{} LIMIT {}").format(query, sql.Literal(limit))
    if lock:
        query = sql.SQL("{} FOR SHARE").format(query)
    return query


def integer_key(plan: TablePlan) -> bool:
    return len(plan.key) == 1 and plan.key[0].base in ("int2", "int4", "int8")


def pick_bounds(sorted_keys: Sequence[Key], chunks: int) -> list[Key]:
    """chunks - 1 boundaries at even quantiles of a sorted key sample, no duplicates."""
    if chunks <= 1 or not sorted_keys:
        return []
    bounds: list[Key] = []
    for i in range(1, chunks):
        k = sorted_keys[min(len(sorted_keys) - 1, i * len(sorted_keys) // chunks)]
        if not bounds or bounds[-1] != k:
            bounds.append(k)
    if bounds and bounds[0] == sorted_keys[0]:
        bounds = bounds[1:]  # an empty first range helps nobody
    return bounds


def ranges_between(lo: Key | None, hi: Key | None, points: Sequence[Key]) -> list[KeyRange]:
    edges: list[Key | None] = [lo, *points, hi]
    return [KeyRange(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]




def key_ends_query(plan: TablePlan, side: Side) -> sql.Composed:
    """min and max of an integer key, as text: two index endpoint lookups."""
    col = _ids(plan.key, side)[0]
    return sql.SQL("SELECT min({c})::pg_catalog.text, max({c})::pg_catalog.text "
                   "FROM {t}").format(c=col, t=plan.table.ident)


def sample_keys_query(plan: TablePlan, chunks: int) -> sql.Composed:
    """Quantiles of a block sample of blue's keys; one parameter: the sample percent.

    The quantiles are picked on the server, so only they travel, not the sample.
    """
    cols = _ids(plan.key, "blue")
    aliases = [sql.Identifier(f"k{i}") for i in range(len(cols))]
    inner = sql.SQL(
        "SELECT {}, row_number() OVER (ORDER BY {}) AS orch_rn, count(*) OVER () AS orch_n "
        "FROM {} TABLESAMPLE SYSTEM ({}) REPEATABLE (7)").format(
        sql.SQL(", ").join(sql.SQL("{} AS {}").format(c, a)
                           for c, a in zip(cols, aliases, strict=True)),
        sql.SQL(", ").join(cols), plan.table.ident, sql.Placeholder())
    return sql.SQL("SELECT {} FROM ({}) s WHERE mod(s.orch_rn - 1, greatest(1, s.orch_n / {}))"
                   " = 0 ORDER BY s.orch_rn").format(
        sql.SQL(", ").join(sql.SQL("CAST(s.{} AS pg_catalog.text)").format(a)
                           for a in aliases), inner, sql.Literal(chunks))


def split_points_query(plan: TablePlan, side: Side, rng: KeyRange, step: int
                       ) -> tuple[sql.Composed, list[str]]:
    """Keys cutting ``rng`` into parts of ``step`` rows (an index-only scan)."""
    where, params = range_predicate(plan, side, rng)
    cols = _ids(plan.key, side)
    aliases = [sql.Identifier(f"k{i}") for i in range(len(cols))]
    inner = sql.SQL("SELECT {}, row_number() OVER (ORDER BY {}) AS orch_rn FROM {} WHERE {}"
                    ).format(
        sql.SQL(", ").join(sql.SQL("{} AS {}").format(c, a)
                           for c, a in zip(cols, aliases, strict=True)),
        sql.SQL(", ").join(cols), plan.table.ident, where)
    query = sql.SQL("SELECT {} FROM ({}) s WHERE s.orch_rn > 1 AND "
                    "mod(s.orch_rn - 1, {}) = 0 ORDER BY s.orch_rn").format(
        sql.SQL(", ").join(sql.SQL("CAST(s.{} AS pg_catalog.text)").format(a)
                           for a in aliases), inner, sql.Literal(step))
    return query, params


def hash_counts_query(plan: TablePlan, side: Side) -> sql.Composed:
    """How many rows of a table without a key have each row hash."""
    return sql.SQL("SELECT h, count(*) FROM (SELECT {} AS h FROM {}) s GROUP BY h").format(
        row_hash(plan, side), plan.table.ident)


def rows_by_hash_query(plan: TablePlan, side: Side) -> sql.Composed:
    """Rows as text by their row hash; one parameter: the int8[] of hashes."""
    texts = [sql.SQL("CAST({} AS pg_catalog.text)").format(c)
             for c in _ids(plan.columns, side)]
    h = row_hash(plan, side)
    return sql.SQL("SELECT {}, {} FROM {} WHERE {} = ANY({}::pg_catalog.int8[])").format(
        h, sql.SQL(", ").join(texts), plan.table.ident, h, sql.Placeholder())
