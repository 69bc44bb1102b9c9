"""``schedule``: the maintenance windows a release may run in.

A window opens at each time its cron expression names, in its time zone, and stays
open for ``duration`` of elapsed time (so a 4h window across a daylight-saving
change is still four hours long). The arithmetic is ``orchestrator.schedule``; here
a malformed expression, zone or duration becomes a ``ConfigError`` naming the field.
"""

from __future__ import annotations

from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import Field, field_validator

from orchestrator.config._base import Duration, _Model, more_than_zero


class MaintenanceWindow(_Model):
    # Five fields, as a Kubernetes CronJob's schedule: "0 3 * * 6" is Saturday 03:00.
    cron: str
    duration: Annotated[Duration, more_than_zero(
        "a maintenance window must last longer than 0s")]
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        # croniter also accepts six or seven fields (seconds, years); a CronJob does
        # not, and the chart derives the CronJob's schedule from the same habits.
        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a cron expression of five fields "
                             "(minute hour day-of-month month day-of-week), e.g. '0 3 * * 6'")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone of the IANA database, e.g. "
                             "'Europe/Berlin' or 'UTC'") from None
        return value


class ScheduleConfig(_Model):
    # Empty: a release may run at any time (the deadline still applies).
    windows: list[MaintenanceWindow] = Field(default_factory=list)
