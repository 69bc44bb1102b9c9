"""Prometheus and the metric checks the canary analysis evaluates."""

from __future__ import annotations

from pydantic import Field, model_validator

from orchestrator.config._base import Duration, Name, SecretRef, _Model


class BlueIdleLimits(_Model):
    """Absolute limits that stand in for a comparison with blue while blue has no data:
    it serves nobody at 100 % once a window has passed, nor in the rollback window,
    where a comparison could only ever be inconclusive."""

    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _has_limit(self) -> BlueIdleLimits:
        if self.max is None and self.min is None:
            raise ValueError("blue_idle needs 'max' or 'min'")
        return self


class Limits(_Model):
    """What a check's value is held to, and how many bad evaluations it takes: the
    same for a check written out (``MetricCheck``) and one from the built-in library
    (``BuiltinCheck``), which is expanded into the former."""

    max: float | None = None
    min: float | None = None
    # Compare with blue: fail when green's value exceeds blue's value (same query with
    # colour=blue) by more than this. For "lower is worse" values (a success rate),
    # ``max_decrease_from_blue`` fails when green is below blue by more than this.
    max_increase_over_blue: float | None = None
    max_decrease_from_blue: float | None = Field(default=None, ge=0)
    # Fail when green's value exceeds this many times blue's (latencies: 1.5 = "at most
    # 50 % slower than blue"). Blue at 0 allows only 0: for values that are often 0 on
    # blue (error rates) use ``max_increase_over_blue``.
    max_ratio_to_blue: float | None = Field(default=None, gt=0)
    # Without it a comparison whose blue side has no data is inconclusive (never a
    # pass); with it green is judged on these limits instead while blue is idle.
    blue_idle: BlueIdleLimits | None = None
    failure_limit: int = Field(default=1, ge=1)
    inconclusive_limit: int = Field(default=3, ge=1)

    @property
    def compares_with_blue(self) -> bool:
        return (self.max_increase_over_blue is not None
                or self.max_decrease_from_blue is not None
                or self.max_ratio_to_blue is not None)


class MetricCheck(Limits):
    """A PromQL query evaluated every interval, against a threshold or a range.

    The query is a template in ``string.Template`` syntax (``$colour``), which keeps
    PromQL's braces intact: $colour, $service, $namespace, $version, $release and
    $window are filled in, plus the labels of ``prometheus.labels``.
    """

    name: Name
    query: str
    # The query for blue, for comparisons, when blue's series cannot be selected by
    # substituting $colour (ingress-nginx marks canary requests with a non-empty
    # ``canary`` label instead of a name). Default: ``query`` with colour=blue.
    baseline_query: str | None = None

    @model_validator(mode="after")
    def _has_threshold(self) -> MetricCheck:
        if self.max is None and self.min is None and not self.compares_with_blue:
            raise ValueError("a check needs 'max', 'min', 'max_increase_over_blue', "
                             "'max_decrease_from_blue' or 'max_ratio_to_blue'")
        if self.blue_idle is not None and not self.compares_with_blue:
            raise ValueError("'blue_idle' replaces a comparison with blue while blue is "
                             "idle, but this check compares nothing with blue")
        if self.max is not None and self.min is not None and self.min > self.max:
            raise ValueError(f"'min' ({self.min}) is above 'max' ({self.max}): no value "
                             "could pass")
        return self

    def describe_limits(self) -> str:
        """The limits as a person reads them: '>= blue - 0.01 (blue idle: >= 0.99)'."""
        parts = [f"<= {self.max:g}" if self.max is not None else "",
                 f">= {self.min:g}" if self.min is not None else "",
                 (f"<= blue + {self.max_increase_over_blue:g}"
                  if self.max_increase_over_blue is not None else ""),
                 (f">= blue - {self.max_decrease_from_blue:g}"
                  if self.max_decrease_from_blue is not None else ""),
                 (f"<= {self.max_ratio_to_blue:g} x blue"
                  if self.max_ratio_to_blue is not None else "")]
        text = ", ".join(p for p in parts if p)
        idle = self.blue_idle
        if idle is not None:
            limits = [f"<= {idle.max:g}" if idle.max is not None else "",
                      f">= {idle.min:g}" if idle.min is not None else ""]
            text += f" (blue idle: {', '.join(p for p in limits if p)})"
        return text


class PrometheusConfig(_Model):
    url: str = "http://127.0.0.1:9090"
    timeout: Duration = 5.0
    bearer_token: SecretRef | None = None
    # Labels filled into check templates besides colour/service/namespace/version.
    labels: dict[str, str] = Field(default_factory=dict)
