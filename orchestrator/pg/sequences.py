"""Sequences are not carried by logical replication: orchestrate moves them itself.

Before a side takes writes, each of its sequences is set past the other side's value
plus a margin, never backwards, so keys generated on either side cannot collide with
rows that replication brings over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.pg import catalog
from orchestrator.pg.names import QualifiedName


@dataclass(frozen=True)
class SequenceMove:
    sequence: QualifiedName
    source_value: int | None
    before: int | None
    after: int | None

    @property
    def moved(self) -> bool:
        return self.before != self.after


def _value(conn: psycopg.Connection[Any], seq: QualifiedName) -> int | None:
    # last_value in pg_sequences is NULL until the first nextval; read the relation
    # itself to get (last_value, is_called) exactly.
    row = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(seq.ident)
                       ).fetchone()
    if row is None:
        return None
    last, called = row
    return int(last) if called else int(last) - 1


def setval_sql(seq: QualifiedName) -> tuple[sql.SQL, tuple[str, str]]:
    """setval of ``seq`` (the new value is the last parameter). The regclass is built
    from the quoted parts on the server, never from bare text, which PostgreSQL would
    fold to lower case and split at every dot."""
    return sql.SQL("SELECT pg_catalog.setval(pg_catalog.format('%%I.%%I', %s::text, %s::text)"
                   "::pg_catalog.regclass, %s, true)"), (seq.schema, seq.name)


def sync_past(source: psycopg.Connection[Any], target: psycopg.Connection[Any], *,
              margin: int, exclude_schemas: tuple[str, ...] = ()) -> list[SequenceMove]:
    """Make every target sequence >= the source value + margin (in its direction)."""
    moves: list[SequenceMove] = []
    target_seqs = {s.qname: s for s in catalog.sequences(target,
                                                          exclude_schemas=exclude_schemas)}
    for seq in catalog.sequences(source, exclude_schemas=exclude_schemas):
        name = seq.qname
        tgt = target_seqs.get(name)
        if tgt is None:
            continue
        src_val = _value(source, name)
        before = _value(target, name)
        if src_val is None:
            moves.append(SequenceMove(name, None, before, before))
            continue
        step = margin * (1 if tgt.increment > 0 else -1)
        wanted = src_val + step
        ahead = before is not None and (
            before >= wanted if tgt.increment > 0 else before <= wanted)
        if ahead:
            moves.append(SequenceMove(name, src_val, before, before))
            continue
        query, params = setval_sql(name)
        target.execute(query, (*params, wanted))
        moves.append(SequenceMove(name, src_val, before, wanted))
    return moves


def compare(blue: psycopg.Connection[Any], green: psycopg.Connection[Any], *,
            exclude_schemas: tuple[str, ...] = ()
            ) -> list[tuple[QualifiedName, int | None, int | None]]:
    """(sequence, blue value, green value) for every sequence on blue."""
    green_names = {s.qname for s in catalog.sequences(green, exclude_schemas=exclude_schemas)}
    out = []
    for seq in catalog.sequences(blue, exclude_schemas=exclude_schemas):
        name = seq.qname
        g = _value(green, name) if name in green_names else None
        out.append((name, _value(blue, name), g))
    return out
