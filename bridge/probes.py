"""``/healthz``, ``/readyz`` and ``/metrics`` on ``BRIDGE_HTTP_PORT`` (CONTRACT §1).

Served by ``websockets``' own server through ``process_request``, which may answer a plain
HTTP GET instead of upgrading (its documented health-check recipe). That keeps the endpoint on
the bridge's event loop, so:

* ``/healthz`` answering at all proves the loop is alive (a blocked loop answers nothing and
  the probe times out, which is what a liveness probe should see);
* ``/readyz`` reads the live state directly, with no thread and no lock;
* no hand-written HTTP parser and no new dependency. ``prometheus_client.start_http_server``
  was the alternative; it runs in a thread and could not serve ``/readyz`` from loop state.

Every response closes its connection (websockets never keeps a rejected handshake alive),
which probes and Prometheus handle fine at their request rates.
"""

from __future__ import annotations

import email.utils
import http
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_REDIS_AGE",
    "ProbeServer",
    "Readiness",
    "ReadinessReport",
]

_log = structlog.get_logger(__name__)

#: All interfaces: the bridge runs in containers, where the probe comes from outside.
DEFAULT_HOST: Final = "0.0.0.0"
#: The status hash is written every 0.5 s, so 3 s without a successful write is an outage,
#: not a slow write.
DEFAULT_MAX_REDIS_AGE: Final = 3.0
_JSON: Final = "application/json"
_TEXT: Final = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class ReadinessReport:
    """The outcome of one readiness check: ready only when ``reasons`` is empty."""

    state: str
    reasons: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return not self.reasons

    def json(self) -> bytes:
        return orjson.dumps(
            {
                "ready": self.ready,
                "state": self.state,
                "reasons": list(self.reasons),
                **self.details,
            }
        )


class Readiness:
    """Decides ``/readyz``: is the bridge doing its job right now?

    Ready means all of: the websocket is connected, its subscriptions were reconciled with
    ``<ns>:subscriptions`` after the latest connect, a frame arrived within ``max_frame_age``
    (a stalled feed is about to be dropped by the watchdog), Redis accepted a keyspace write
    within ``max_redis_age``, and neither ``publishing()`` (publishes failing for a while: an ACL
    denying the tick channels, the namespace lease unconfirmed) nor ``control()`` (Redis
    refusing to hand over or store commands: an ACL without ``BLMOVE``) reports a problem.
    Each failed condition adds a reason, so a 503 says what is wrong.
    A standby (bridge/lease.py) is not ready, for that reason alone.

    "Writable" means the keyspace, not pub/sub: a Redis out of memory (``noeviction``) or demoted
    to a read-only replica still takes ``PUBLISH``, yet it can neither apply a command nor keep
    the status, and a replica's publishes never reach the master's subscribers.
    """

    def __init__(
        self,
        *,
        state: Callable[[], str],
        connected: Callable[[], bool],
        reconciled: Callable[[], bool],
        last_frame_age: Callable[[], float | None],
        redis_write_age: Callable[[], float | None],
        max_frame_age: float,
        max_redis_age: float = DEFAULT_MAX_REDIS_AGE,
        redis_error: Callable[[], str | None] = lambda: None,
        standby: Callable[[], str | None] = lambda: None,
        publishing: Callable[[], str | None] = lambda: None,
        control: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._state = state
        self._connected = connected
        self._reconciled = reconciled
        self._last_frame_age = last_frame_age
        self._redis_write_age = redis_write_age
        self._redis_error = redis_error
        self._standby = standby
        self._publishing = publishing
        self._control = control
        self.max_frame_age = max_frame_age
        self.max_redis_age = max_redis_age

    def check(self) -> ReadinessReport:
        """Every failed condition, not just the first, so one 503 says all that is wrong."""
        holder = self._standby()
        if holder is not None:  # waiting by design: the other conditions would only mislead
            return ReadinessReport(
                "standby",
                (f"standby: another bridge holds the namespace ({holder})",),
                {"last_frame_age": None, "redis_write_age": None},
            )
        state = self._state()
        reasons: list[str] = []
        frame_age = self._last_frame_age()
        redis_age = self._redis_write_age()
        if not self._connected():
            reasons.append(f"websocket not connected (state {state})")
        else:
            if not self._reconciled():
                reasons.append("subscriptions not yet reconciled with Redis")
            if frame_age is None or frame_age > self.max_frame_age:
                shown = "never" if frame_age is None else f"{frame_age:.1f} s ago"
                reasons.append(f"feed is stale: last frame {shown}")
        redis_reason = None
        if redis_age is None:
            redis_reason = "redis not writable: no successful write yet"
        elif redis_age > self.max_redis_age:
            redis_reason = f"redis not writable: last successful write {redis_age:.1f} s ago"
        if redis_reason is not None:
            error = self._redis_error()
            reasons.append(redis_reason if error is None else f"{redis_reason} ({error})")
        for problem in (self._publishing(), self._control()):
            if problem is not None:
                reasons.append(problem)
        details = {
            "last_frame_age": _rounded(frame_age),
            "redis_write_age": _rounded(redis_age),
        }
        return ReadinessReport(state, tuple(reasons), details)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


class ProbeServer:
    """The HTTP endpoint; ``async with ProbeServer(...)`` or ``start()``/``stop()``.

    ``metrics`` renders ``/metrics``, ``readiness`` decides ``/readyz`` and ``liveness``
    supplies the (informative) body of ``/healthz``. ``port=0`` picks a free port, readable
    from :attr:`port` after :meth:`start`.
    """

    def __init__(
        self,
        *,
        metrics: Callable[[], bytes],
        readiness: Callable[[], ReadinessReport],
        liveness: Callable[[], Mapping[str, Any]] = dict,
        host: str = DEFAULT_HOST,
        port: int = 9100,
    ) -> None:
        self._metrics = metrics
        self._readiness = readiness
        self._liveness = liveness
        self.host = host
        self.port = port
        self.requests = 0
        self._server: Server | None = None
        self._routes: dict[str, Callable[[], Response]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics_page,
            "/": self._index,
        }

    async def start(self) -> None:
        """Listen. Raises ``OSError`` when the port cannot be bound."""
        if self._server is not None:
            raise RuntimeError("probe server already started")
        self._server = await serve(
            self._never_upgraded,
            self.host,
            self.port,
            process_request=self._process_request,
            ping_interval=None,
            open_timeout=5,
            compression=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        _log.info("http_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def __aenter__(self) -> ProbeServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- requests ------------------------------------------------------------------------

    def _process_request(self, _connection: ServerConnection, request: Request) -> Response:
        self.requests += 1
        if request.method not in ("GET", "HEAD"):
            response = _response(http.HTTPStatus.METHOD_NOT_ALLOWED, b"GET only\n", _TEXT)
            response.headers["Allow"] = "GET, HEAD"
            return response
        route = self._routes.get(request.path.partition("?")[0])
        if route is None:
            return _response(http.HTTPStatus.NOT_FOUND, b"not found\n", _TEXT)
        response = route()
        if request.method == "HEAD":  # same headers, Content-Length included; no body
            response.body = b""
        return response

    @staticmethod
    async def _never_upgraded(connection: ServerConnection) -> None:
        # process_request answers every request, so no websocket is ever opened.
        await connection.close()

    def _healthz(self) -> Response:
        body = orjson.dumps({"alive": True, **self._liveness()})
        return _response(http.HTTPStatus.OK, body, _JSON)

    def _readyz(self) -> Response:
        report = self._readiness()
        status = http.HTTPStatus.OK if report.ready else http.HTTPStatus.SERVICE_UNAVAILABLE
        return _response(status, report.json(), _JSON)

    def _metrics_page(self) -> Response:
        return _response(http.HTTPStatus.OK, self._metrics(), CONTENT_TYPE_PLAIN_0_0_4)

    def _index(self) -> Response:
        return _response(http.HTTPStatus.OK, b"/healthz /readyz /metrics\n", _TEXT)
