"""HAProxy router: server weights changed through the runtime API (stats socket).

The runtime API changes weights in the running process; there is no reload, so no
connection is dropped and nothing on disk changes. Consequently a restart of HAProxy
returns to the weights in its configuration file: whoever owns that file must keep
it in line (orchestrate reads the live weights before each change and reports a drift
rather than silently re-applying its own).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import structlog

from orchestrator.config import HAProxyRouterConfig
from orchestrator.retry import socket_retrying
from orchestrator.routers.base import RouterError, WeightDriftError, Weights

log = structlog.get_logger()

_GET_WEIGHT = re.compile(r"^\s*(\d+)\s+\(initial\s+\d+\)\s*$")
_TCP_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^/:\[\]]+)):(?P<port>\d+)$")
_CONNECT_ATTEMPTS = 3
_HINT = (
    "check router.socket: HAProxy needs 'stats socket <path> level admin' (or "
    "'ipv4@host:port') in its global section, and this user must be able to open it"
)


class _NoResponse(OSError):
    """HAProxy closed the connection without answering (reloading, overloaded)."""


class HAProxyRouter:
    def __init__(self, cfg: HAProxyRouterConfig) -> None:
        self.cfg = cfg
        self.backend = cfg.backend
        self.blue_server = cfg.blue_server
        self.green_server = cfg.green_server
        self.timeout = cfg.timeout
        match = _TCP_ADDRESS.match(cfg.socket)
        self._tcp: tuple[str, int] | None = None
        if match and "/" not in cfg.socket:
            self._tcp = (match.group("v6") or match.group("host"), int(match.group("port")))

    # -- the runtime API -------------------------------------------------------

    def describe(self) -> str:
        return f"haproxy backend {self.backend} via {self.cfg.socket}"

    def _connect(self) -> socket.socket:
        if self._tcp is not None:
            return socket.create_connection(self._tcp, timeout=self.timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(Path(self.cfg.socket)))
        except BaseException:
            sock.close()
            raise
        return sock

    def _send_once(self, command: str) -> str:
        with self._connect() as sock:
            sock.sendall(command.encode() + b"\n")
            # Without 'prompt', HAProxy answers one command and closes: read to EOF.
            chunks: list[bytes] = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        if not chunks:
            raise _NoResponse(f"no answer to {command!r}")
        return b"".join(chunks).decode(errors="replace").strip()

    def _command(self, command: str) -> str:
        """One command on one short connection. Every command we send is idempotent
        (reads, or sets an absolute weight), so retrying after a broken connection
        cannot apply a change twice."""
        retrying = socket_retrying(f"haproxy {command.split(' ', 1)[0]} via {self.cfg.socket}",
                                   attempts=_CONNECT_ATTEMPTS)
        try:
            answer: str = retrying(self._send_once, command)
        except OSError as cause:
            reason = getattr(cause, "strerror", None) or str(cause)
            raise RouterError(
                f"cannot reach the HAProxy runtime API at {self.cfg.socket} "
                f"({_CONNECT_ATTEMPTS} attempts): {reason}",
                hint=_HINT,
            ) from cause
        return answer

    def _get_weight(self, server: str) -> int:
        answer = self._command(f"get weight {self.backend}/{server}")
        match = _GET_WEIGHT.match(answer)
        if not match:
            raise RouterError(
                f"HAProxy did not return the weight of {self.backend}/{server}: {answer!r}",
                hint=f"check that backend '{self.backend}' has a server '{server}'",
            )
        return int(match.group(1))

    def _set_weight(self, server: str, weight: int) -> None:
        answer = self._command(f"set weight {self.backend}/{server} {weight}")
        # Success is an empty answer; anything else is HAProxy's error message.
        if answer:
            raise RouterError(
                f"HAProxy refused 'set weight {self.backend}/{server} {weight}': {answer}",
                hint="the backend needs a dynamic balance algorithm (roundrobin, "
                "leastconn, random), not static-rr or a hash without 'consistent'",
            )

    # -- TrafficRouter ---------------------------------------------------------

    def check(self) -> None:
        level = self._command("show cli level")
        if level != "admin":
            raise RouterError(
                f"the HAProxy runtime API at {self.cfg.socket} is at level {level!r}, "
                "but changing weights needs 'admin'",
                hint="declare the stats socket with 'level admin'",
            )
        answer = self._command(f"show servers state {self.backend}")
        lines = answer.splitlines()
        # A known backend answers with the format version ("1") and a '#' header line;
        # anything else is an error message such as "Can't find backend.".
        if len(lines) < 2 or not lines[1].startswith("#"):
            raise RouterError(
                f"HAProxy has no backend '{self.backend}': {answer}",
                hint="set router.backend to the backend holding the blue and green servers",
            )
        servers = {
            fields[3]
            for fields in (line.split() for line in lines[2:])
            if len(fields) >= 4 and fields[1] == self.backend
        }
        missing = [s for s in (self.blue_server, self.green_server) if s not in servers]
        if missing:
            raise RouterError(
                f"HAProxy backend '{self.backend}' has no server "
                f"{' nor '.join(repr(m) for m in missing)} "
                f"(it has: {', '.join(sorted(servers)) or 'none'})",
                hint="set router.blue_server / router.green_server to the server names "
                "in the backend",
            )
        self.current()

    def _both_zero_error(self) -> RouterError:
        return RouterError(
            f"both servers of HAProxy backend '{self.backend}' have weight 0: "
            "no traffic is served",
            hint="set a weight by hand (set weight "
            f"{self.backend}/{self.blue_server} 100) and decide how to continue",
        )

    def _live(self) -> Weights | None:
        """The live weights in percent; None when both servers are at 0."""
        blue = self._get_weight(self.blue_server)
        green = self._get_weight(self.green_server)
        if blue + green == 0:
            return None
        # HAProxy weights are relative (0..256), not percentages.
        return Weights.green_at(round(100 * green / (blue + green)))

    def current(self) -> Weights:
        live = self._live()
        if live is None:
            raise self._both_zero_error()
        return live

    def set_weights(self, target: Weights, *, expected: Weights | None = None) -> Weights:
        if target.blue + target.green != 100 or min(target.blue, target.green) < 0:
            raise RouterError(f"invalid target weights {target}")
        live = self._live()
        if expected is not None:
            if live is None:
                raise self._both_zero_error()
            if live != expected:
                raise WeightDriftError(expected, live, self.describe())
        # Without an expectation (a rollback, say) an outage with both weights at 0 is
        # repaired rather than refused: any target serves more traffic than nothing.
        #
        # Raise the server that gains traffic before lowering the one that loses it.
        # In between, each server holds the larger of its old and new weight, so the
        # green share lies between the old and the new share (traffic never swings
        # past the target, nor back) and the weights are never both 0, which answers
        # 503 to every request. Lowering first goes through 0/0 when moving from
        # 100/0 to 0/100; test_no_request_fails_while_weights_move sees those 503s.
        if live is None or target.green >= live.green:
            order = [(self.green_server, target.green), (self.blue_server, target.blue)]
        else:
            order = [(self.blue_server, target.blue), (self.green_server, target.green)]
        for server, weight in order:
            self._set_weight(server, weight)
        after = self.current()
        if after != target:
            raise RouterError(
                f"set {target} on {self.describe()}, but it reads back {after}",
                hint="someone may be changing the weights at the same time",
            )
        log.info("weights changed", router=self.describe(), weights=str(after))
        return after

