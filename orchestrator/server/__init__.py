"""``orchestrate serve``: an Alertmanager webhook receiver that rolls a release back.

    POST /alertmanager   Alertmanager's webhook payload (version 4), bearer token
    GET  /healthz        200 while the process serves
    GET  /metrics        the receiver's own counters, Prometheus text format

A firing alert that concerns this release asks it to roll back
(``StateStore.request_rollback``): by default an alert whose ``release`` label names
this release; with ``alerts.matchers`` configured, one satisfying all of them. Never
one naming another release, nor one that started before the release did (it is about
the previous version). The orchestrator running the release notices the request
within a second (it polls it while it waits between evaluations).
When no orchestrator holds the release's lock (it crashed, or was never restarted)
the receiver performs the rollback itself, in a background thread, one at a time.

    payload.py   the webhook body            receiver.py  the decisions
    state.py     short-timeout state store   app.py       FastAPI app, uvicorn protocol
    run.py       token/TLS rules, serving

Answers, so that Alertmanager (which retries 5xx, not 4xx) does the right thing:

    202  a rollback was requested, or started by this receiver: {"action": ...}
    200  nothing to do, and why: resolved or non-matching alerts, a release that is not
         running, a rollback already requested (a repeated alert queues nothing new)
    400  not an Alertmanager payload        401  missing or wrong token
    413  body too large                     503  the state database is unreachable or
                                                 did not answer in alerts.state_timeout

The token is compared in constant time and never logged. Without a token the
receiver refuses to start, unless it listens on a loopback address and was started
with ``--insecure``; off loopback a token shorter than 32 characters is refused, and
plain HTTP (no ``alerts.tls``) is warned about loudly.
"""

from orchestrator.config import AlertsConfig
from orchestrator.matchers import AlertSelector, Matchers
from orchestrator.server.app import ALERT_PATH, create_app
from orchestrator.server.payload import MAX_BODY_BYTES, Alert, PayloadError, parse_payload
from orchestrator.server.pool import ReceiverStore, StoreUnavailable, Ticket
from orchestrator.server.receiver import REFUSED, AlertReceiver, Decision
from orchestrator.server.run import (
    MIN_TOKEN_CHARS,
    ReceiverHTTP,
    build_receiver,
    check_transport,
    is_loopback,
    parse_listen,
    resolve_token,
    serve,
)
from orchestrator.server.state import ReceiverStateStore, connection_params

__all__ = [
    "ALERT_PATH", "MAX_BODY_BYTES", "MIN_TOKEN_CHARS", "REFUSED", "Alert", "AlertReceiver",
    "AlertSelector", "AlertsConfig", "Decision", "Matchers", "PayloadError", "ReceiverHTTP",
    "ReceiverStateStore", "ReceiverStore", "StoreUnavailable", "Ticket", "build_receiver",
    "check_transport", "connection_params", "create_app", "is_loopback", "parse_listen",
    "parse_payload", "resolve_token", "serve",
]
