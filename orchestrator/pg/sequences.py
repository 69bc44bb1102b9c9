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
from orchestrator.pg.conn import qualified


@dataclass(frozen=True)
class SequenceMove:
    sequence: str
    source_value: int | None
    before: int | None
    after: int | None

    @property
    def moved(self) -> bool:
        return self.before != self.after


def _value(conn: psycopg.Connection[Any], seq: str) -> int | None:
    # last_value in pg_sequences is NULL until the first nextval; read the relation
    # itself to get (last_value, is_called) exactly.
    row = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(qualified(seq))
                       ).fetchone()
    if row is None:
        return None
    last, called = row
    return int(last) if called else int(last) - 1


def sync_past(source: psycopg.Connection[Any], target: psycopg.Connection[Any], *,
              margin: int, exclude_schemas: tuple[str, ...] = ()) -> list[SequenceMove]:
    """Make every target sequence >= the source value + margin (in its direction)."""
    moves: list[SequenceMove] = []
    target_seqs = {s.qualified: s for s in catalog.sequences(target,
                                                              exclude_schemas=exclude_schemas)}
    for seq in catalog.sequences(source, exclude_schemas=exclude_schemas):
        tgt = target_seqs.get(seq.qualified)
        if tgt is None:
            continue
        src_val = _value(source, seq.qualified)
        before = _value(target, seq.qualified)
        if src_val is None:
            moves.append(SequenceMove(seq.qualified, None, before, before))
            continue
        step = margin * (1 if tgt.increment > 0 else -1)
        wanted = src_val + step
        ahead = before is not None and (
            before >= wanted if tgt.increment > 0 else before <= wanted)
        if ahead:
            moves.append(SequenceMove(seq.qualified, src_val, before, before))
            continue
        target.execute("SELECT setval(%s::regclass, %s, true)", (seq.qualified, wanted))
        moves.append(SequenceMove(seq.qualified, src_val, before, wanted))
    return moves


def compare(blue: psycopg.Connection[Any], green: psycopg.Connection[Any], *,
            exclude_schemas: tuple[str, ...] = ()) -> list[tuple[str, int | None, int | None]]:
    """(sequence, blue value, green value) for every sequence on blue."""
    green_names = {s.qualified for s in catalog.sequences(green, exclude_schemas=exclude_schemas)}
    out = []
    for seq in catalog.sequences(blue, exclude_schemas=exclude_schemas):
        g = _value(green, seq.qualified) if seq.qualified in green_names else None
        out.append((seq.qualified, _value(blue, seq.qualified), g))
    return out
