"""What every section shares: durations, names, secret references, the strict model.

Secrets are never written inline: a password is a reference to an environment
variable or a file, resolved only when a connection is opened.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from orchestrator.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """'250ms', '30s', '5m', '1h' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s', '5m'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration; write e.g. '30s', '5m', '1h' or 250ms")


Duration = Annotated[float, BeforeValidator(parse_duration)]


def more_than_zero(message: str) -> AfterValidator:
    """A duration (or an optional one) that must be more than 0s; ``message`` says
    which one in the error."""
    def check(value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError(message)
        return value
    return AfterValidator(check)

Name = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9_-]{0,46}[a-z0-9])?$")]


class _Model(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Model):
    """Where a secret comes from. Exactly one of ``env`` and ``file``."""

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' (a variable name) or 'file' (a path)")
        return self

    def describe(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"

    def resolve(self) -> str:
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(
                    f"the environment variable {self.env} is not set",
                    hint=f"export {self.env}=... before running orchestrate",
                )
            where = f"the environment variable {self.env}"
        else:
            assert self.file is not None
            try:
                value = self.file.read_text().rstrip("\n")
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the secret file {self.file}: {exc.strerror}",
                    hint="check the path and that this user may read it",
                ) from exc
            where = f"the secret file {self.file}"
        if not value:
            # An empty secret is a deployment mistake (a Secret key not mounted, a
            # variable exported empty), never a password: say so before any server
            # sees a login attempt.
            raise ConfigError(f"{where} is empty",
                              hint="put the secret there, or fix the reference in the config")
        return value


class ValueOrSecret(_Model):
    """A value written out (a plain string), or read from a secret when it is used
    (``{env: NAME}`` or ``{file: /path}``): exactly one of the three."""

    # What a malformed one is told; each kind says which forms it takes.
    forms: ClassVar[str] = "a string, or {env: NAME} or {file: /path} (exactly one of them)"

    value: str | None = None
    env: str | None = None
    file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _written_or_referenced(cls, value: Any) -> Any:
        # A plain string is the value itself; a mapping says where to read it.
        if isinstance(value, str):
            return {"value": value}
        if not isinstance(value, dict | cls):
            raise ValueError(cls.forms)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if sum(x is not None for x in (self.value, self.env, self.file)) != 1:
            raise ValueError(self.forms)
        return self

    def resolve(self) -> str:
        if self.value is not None:
            return self.value
        return SecretRef(env=self.env, file=self.file).resolve()
