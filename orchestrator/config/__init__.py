"""The release configuration: a YAML file validated against pydantic models.

Secrets are never written inline: a password is a reference to an environment
variable or a file, resolved only when a connection is opened. A wrong or
missing field becomes one ``ConfigError`` that names the field.

One module per section, each importing only ``_base`` and the sections it nests;
``release`` holds the whole ``ReleaseConfig`` and the loader. Everything is
re-exported here, so callers import from ``orchestrator.config`` alone. Nothing in
this package imports the runtime (canary analysis, routers, server): the built-in
check library lives in ``builtin`` because loading a config expands it.
"""

from orchestrator.config._base import Duration, Name, SecretRef, parse_duration
from orchestrator.config.alerts import AlertsConfig, AlertsTLSConfig
from orchestrator.config.builtin import BuiltinCheck, ColourValues
from orchestrator.config.canary import (
    CanaryConfig,
    CanaryStage,
    HeaderValue,
    ProbeConfig,
    Webhook,
)
from orchestrator.config.database import (
    BackupConfig,
    DatabaseConfig,
    GreenConfig,
    MigrationsConfig,
    StateConfig,
)
from orchestrator.config.metrics import MetricCheck, PrometheusConfig
from orchestrator.config.notify import NotificationsConfig, NotifyTarget, UrlRef
from orchestrator.config.pair import PairConfig, PairRoutes
from orchestrator.config.release import (
    ReleaseConfig,
    ReleaseSection,
    RollbackConfig,
    ToolsConfig,
    load_config,
    parse_config,
)
from orchestrator.config.routers import (
    FakeRouterConfig,
    GatewayRouterConfig,
    HAProxyRouterConfig,
    IngressNginxRouterConfig,
    KubeTarget,
    RouterConfig,
    ServiceRouterConfig,
)
from orchestrator.config.schedule import MaintenanceWindow, ScheduleConfig
from orchestrator.config.sync import InitialCopyConfig, SyncConfig
from orchestrator.config.telemetry import PushgatewayConfig, TelemetryConfig
from orchestrator.config.validate import ValidateConfig

__all__ = [
    "AlertsConfig",
    "AlertsTLSConfig",
    "BackupConfig",
    "BuiltinCheck",
    "CanaryConfig",
    "CanaryStage",
    "ColourValues",
    "DatabaseConfig",
    "Duration",
    "FakeRouterConfig",
    "GatewayRouterConfig",
    "GreenConfig",
    "HAProxyRouterConfig",
    "HeaderValue",
    "IngressNginxRouterConfig",
    "InitialCopyConfig",
    "KubeTarget",
    "MaintenanceWindow",
    "MetricCheck",
    "MigrationsConfig",
    "Name",
    "NotificationsConfig",
    "NotifyTarget",
    "PairConfig",
    "PairRoutes",
    "ProbeConfig",
    "PrometheusConfig",
    "PushgatewayConfig",
    "ReleaseConfig",
    "ReleaseSection",
    "RollbackConfig",
    "RouterConfig",
    "ScheduleConfig",
    "SecretRef",
    "ServiceRouterConfig",
    "StateConfig",
    "SyncConfig",
    "TelemetryConfig",
    "ToolsConfig",
    "UrlRef",
    "ValidateConfig",
    "Webhook",
    "load_config",
    "parse_config",
    "parse_duration",
]
