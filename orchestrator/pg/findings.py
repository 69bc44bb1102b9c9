"""What a validation finds besides differing rows: a problem fails the release, a note not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["problem", "note"]


@dataclass(frozen=True)
class Finding:
    severity: Severity
    kind: str  # table, column, generated, not_null, index, constraint, sequence, extension, config
    object: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "kind": self.kind, "object": self.object,
                "message": self.message}


def problem(kind: str, obj: str, message: str) -> Finding:
    return Finding("problem", kind, obj, message)


def note(kind: str, obj: str, message: str) -> Finding:
    return Finding("note", kind, obj, message)
