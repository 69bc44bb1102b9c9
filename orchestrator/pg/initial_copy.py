"""The initial copy's public face, kept where callers import it from.

The engine lives in the ``orchestrator.pg.copy`` package, split by job; its
docstring explains the design.
"""

from __future__ import annotations

from orchestrator.config import InitialCopyConfig
from orchestrator.pg import copy as _copy

# Everything the package exports, by its own list: a name added there is here too,
# with no second list to forget.
from orchestrator.pg.copy import *  # noqa: F403
from orchestrator.pg.copy.pipes import Copier as _Copier

__all__ = [*_copy.__all__, "InitialCopyConfig", "_Copier"]  # noqa: PLE0604
