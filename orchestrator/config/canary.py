"""``canary``: stages, their hooks, the other side's probe, and which checks run."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.config._base import Duration, Name, ValueOrSecret, _Model, more_than_zero
from orchestrator.config.builtin import BuiltinCheck, expand
from orchestrator.config.metrics import MetricCheck


class HeaderValue(ValueOrSecret):
    """A hook's header: a plain value, or one read from a secret when the hook is
    called (never stored in the config): ``{env: SMOKE_TOKEN, prefix: "Bearer "}``."""

    forms: ClassVar[str] = ("a header is a string, or {env: NAME} or {file: /path} "
                            "(exactly one of them), with an optional prefix such as "
                            "'Bearer '")

    prefix: str = ""

    def resolve(self) -> str:
        return self.prefix + super().resolve()


class Webhook(_Model):
    """An HTTP call before or after a canary stage (a smoke test, a load test, a
    notification); see ``orchestrator/canary/hooks.py``. A 2xx answer passes."""

    name: Name
    url: str
    method: Literal["POST", "PUT"] = "POST"
    # Per attempt; connection errors, timeouts and 408/425/429/502/503/504 are retried
    # ``retries`` times, any other answer is the hook's verdict.
    timeout: Annotated[Duration, more_than_zero("a hook's timeout must be more than 0s")] = 10.0
    retries: int = Field(default=2, ge=0, le=10)
    headers: dict[str, HeaderValue] = Field(default_factory=dict)
    # Extra fields for the JSON body, e.g. which smoke test suite to run.
    metadata: dict[str, str] = Field(default_factory=dict)
    on_failure: Literal["rollback", "ignore"] = "rollback"

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        if re.match(r"^https?://[^/@\s]*@", url):
            # Credentials in a URL end up in logs and in the stored config.
            raise ValueError("the URL holds credentials; send them in a header with a "
                             "secret reference instead: headers: {Authorization: "
                             "{env: NAME, prefix: 'Bearer '}}")
        return url


class CanaryStage(_Model):
    weight: int = Field(ge=0, le=100)
    duration: Duration = 60.0
    # Stop before this stage until someone runs `orchestrate promote`.
    manual_gate: bool = False
    # Evaluation interval for this stage; default: canary.interval.
    interval: Annotated[Duration, more_than_zero(
        "a stage's interval must be more than 0s")] | None = None
    # Names of the checks evaluated in this stage; default: all of canary.checks.
    checks: list[str] | None = None
    # Hooks run in order before traffic moves to this stage's weight (after a manual
    # gate), and after the stage's analysis passed.
    before: list[Webhook] = Field(default_factory=list)
    after: list[Webhook] = Field(default_factory=list)


def _default_stages() -> list[CanaryStage]:
    return [
        CanaryStage(weight=0, duration=30.0),
        CanaryStage(weight=5, duration=60.0),
        CanaryStage(weight=20, duration=60.0),
        CanaryStage(weight=100, duration=60.0),
    ]


class ProbeConfig(_Model):
    """The other side's health, a check of its own (``orchestrator/pg/probe.py``): a
    statement on green (and on blue until promotion) every ``interval`` (the canary's
    analysis interval by default), through every stage and the rollback window."""

    # Per probe: connecting and answering ``SELECT 1``. A paused server answers
    # neither; a loaded one answers well within this.
    timeout: Duration = 5.0
    interval: Duration | None = None
    # Consecutive failed probes that fail the stage (or, in the window, roll back).
    failure_limit: int = Field(default=3, ge=1)


class CanaryConfig(_Model):
    interval: Duration = 10.0
    window: Duration = 30.0
    stages: list[CanaryStage] = Field(default_factory=_default_stages)
    # Checks from the built-in library, expanded into ``checks`` when the config is
    # loaded (declared before ``checks``: its validator reads them). A check in
    # ``checks`` with the same name replaces the built-in one.
    builtin: list[BuiltinCheck] = Field(default_factory=list)
    checks: list[MetricCheck] = Field(default_factory=list, validate_default=True)
    # A release without any analysis must say so twice: ``checks: []`` and this. With
    # the haproxy and ingress-nginx routers a config naming no checks gets default
    # ones (orchestrator/config/defaults.py); the other routers have no default source.
    allow_unanalysed: bool = False
    # What too many inconclusive evaluations (no data, Prometheus down) do.
    on_inconclusive: Literal["rollback", "pause"] = "rollback"
    probe: ProbeConfig = Field(default_factory=ProbeConfig)

    @field_validator("stages")
    @classmethod
    def _increasing(cls, stages: list[CanaryStage]) -> list[CanaryStage]:
        if not stages:
            raise ValueError("at least one stage is needed")
        weights = [s.weight for s in stages]
        if weights != sorted(weights):
            raise ValueError(f"stage weights must not decrease, got {weights}")
        if weights[-1] != 100:
            raise ValueError("the last stage must send 100 % of traffic to green")
        return stages

    @field_validator("checks")
    @classmethod
    def _with_builtins(cls, checks: list[MetricCheck], info: Any) -> list[MetricCheck]:
        # ``info`` is pydantic's ValidationInfo; ``data`` holds the fields validated
        # so far (``builtin`` is absent when it was itself invalid).
        names = [c.name for c in checks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"check names must be unique; repeated: {', '.join(twice)}")
        builtins: list[BuiltinCheck] = info.data.get("builtin") or []
        if not builtins:
            return checks
        expanded = [expand(b) for b in builtins]
        names_b = [c.name for c in expanded]
        twice = sorted({n for n in names_b if names_b.count(n) > 1})
        if twice:
            raise ValueError(f"two built-in checks are named {', '.join(twice)}; give one "
                             "of them a 'name'")
        own = set(names)
        return [*(c for c in expanded if c.name not in own), *checks]

    @model_validator(mode="after")
    def _analysed_or_said_so(self) -> CanaryConfig:
        if self.allow_unanalysed and self.checks:
            raise ValueError(
                "allow_unanalysed is true, yet there are checks ("
                + ", ".join(c.name for c in self.checks) + "; a config naming none gets "
                "the router's default checks): to release on time alone write "
                "'checks: []' too, or drop allow_unanalysed to keep the checks")
        if self.allow_unanalysed and "checks" not in self.model_fields_set:
            raise ValueError("allow_unanalysed: true needs 'checks: []' as well, so that "
                             "no analysis is said twice, not assumed")
        if not self.checks and not self.allow_unanalysed:
            raise ValueError(
                "no checks: stages would advance on time alone and promote a broken green. "
                "Name checks in canary.checks or canary.builtin (e.g. builtin: [{check: "
                "request-success-rate, provider: istio, max_decrease_from_blue: 0.01}]); "
                "the haproxy and ingress-nginx routers get default checks when none are "
                "named, the gateway and service routers have no default metric source. "
                "To release without analysis say so: 'checks: []' and "
                "'allow_unanalysed: true' (see docs/canary.md)")
        return self

    @model_validator(mode="after")
    def _stage_checks_exist(self) -> CanaryConfig:
        known = {c.name for c in self.checks}
        for i, stage in enumerate(self.stages):
            unknown = [n for n in stage.checks or [] if n not in known]
            if unknown:
                raise ValueError(
                    f"stages[{i}].checks names {', '.join(unknown)}, which is not a check "
                    f"(known: {', '.join(sorted(known)) or 'none'})")
            hooks = [h.name for h in (*stage.before, *stage.after)]
            twice = sorted({n for n in hooks if hooks.count(n) > 1})
            if twice:
                raise ValueError(f"stages[{i}]: hook names must be unique within a stage "
                                 f"(they name its measurements); repeated: {', '.join(twice)}")
        return self

    def checks_for(self, stage: CanaryStage) -> list[MetricCheck]:
        """The checks a stage evaluates, in config order."""
        if stage.checks is None:
            return list(self.checks)
        wanted = set(stage.checks)
        return [c for c in self.checks if c.name in wanted]

    def interval_for(self, stage: CanaryStage) -> float:
        return stage.interval if stage.interval is not None else self.interval

