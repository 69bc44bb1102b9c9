"""``pair``: two databases named once, for releases that run again and again.

Instead of ``blue:`` and ``green:`` (fixed roles, edited by hand after every
promotion), a config may name the two sides ``a`` and ``b``. The control state
records which one is live; each run releases from the live side (blue) to the other
(green), and a promoted release makes green the live side for the next run. See
docs/recurring.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from orchestrator.config._base import _Model
from orchestrator.config.database import DatabaseConfig, GreenConfig

Side = Literal["a", "b"]
SIDES: tuple[Side, Side] = ("a", "b")


def other(side: Side) -> Side:
    return "b" if side == "a" else "a"


class PairRoutes(_Model):
    """The router's name for the application that uses each database: HAProxy server
    names, Gateway/Service backend Service names, or Service selector values. Also
    what ``$colour`` means in check queries (the side's route)."""

    a: str = Field(min_length=1)
    b: str = Field(min_length=1)

    def of(self, side: Side) -> str:
        return self.a if side == "a" else self.b


class PairConfig(_Model):
    # Each side is green once in a while, so each may have its database created.
    a: GreenConfig
    b: GreenConfig
    # The live side when the control state has no record yet (the first run).
    initial_live: Side = "a"
    # Unset: a's route is the router's blue name (router.blue_server, .blue_service,
    # .blue_value) and b's its green name, so a config written for blue/green keeps
    # its router section.
    routes: PairRoutes | None = None

    def side(self, name: Side) -> GreenConfig:
        return self.a if name == "a" else self.b

    def as_blue(self, name: Side) -> DatabaseConfig:
        """The side as a run's blue. Built from what the user wrote (fields left out
        stay unset), so the resolved config's digest is that of a blue/green config."""
        return DatabaseConfig.model_validate(self.side(name).model_dump(
            by_alias=True, exclude_unset=True, exclude={"create_database"}))

    def as_green(self, name: Side) -> GreenConfig:
        return GreenConfig.model_validate(self.side(name).model_dump(
            by_alias=True, exclude_unset=True))
