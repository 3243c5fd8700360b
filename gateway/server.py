"""The gRPC server of one gateway: `yuan.serving.v1`, standard health, reflection, auth, TLS, drain.

`GatewayServer` runs the `Gateway` and a `grpc.aio` server on one event loop in a dedicated thread,
so it works the same in a CLI process, a test, or a Ray Serve replica. It binds first and answers
health NOT_SERVING (and UNAVAILABLE to calls) while the backend loads, then SERVING. `drain`
switches health to NOT_SERVING and refuses new calls with UNAVAILABLE at once; `stop` drains, gives
in-flight calls `grace_s` (counted from the drain's start) to finish, then cancels the rest in the
engine, so each stream still gets its final message (FINISH_REASON_CANCELLED, with usage) and
each unary call its partial answer, then closes the server and the backend. The port stays open
while draining, so health checks see NOT_SERVING and new calls a clear UNAVAILABLE. Why a plain
`grpc.aio` server and not Ray Serve's gRPC proxy: see docs/GRPC.md (measured: the proxy adds ~7x per
unary call here).
"""

from __future__ import annotations

import asyncio
import hmac
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from gateway.engine import Engine
from gateway.options import ServerOptions
from gateway.service import Gateway
from gateway.servicer import SERVICE as SERVICE_DESCRIPTOR
from gateway.servicer import ServingState, YuanServingServicer, add_to_server
from gateway.tokenizer import Tokenizer
from model import skinny

SERVICE = SERVICE_DESCRIPTOR.full_name
HEALTH_PREFIX = "/grpc.health.v1.Health/"
CANCEL_WAIT_S = 2.0  # after the grace period: time cancelled calls get to send their final message
CLOSE_WAIT_S = 30.0  # at shutdown: the most the engine thread's last step is waited for


@dataclass
class Backend:
    """What the server serves: an engine and its tokenizer, a description, and how to close it."""

    engine: Engine
    tokenizer: Tokenizer
    info: dict
    close: Callable[[], None] = field(default=lambda: None)
    # runs beside the engine until drain, with the gateway and the servicer's state
    control: Callable[[Gateway, ServingState], Awaitable[None]] | None = None
    gateway_id: str = ""  # named in every response's trailing metadata (`yuan-gateway`)


class _BearerAuth(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` on every call except health: exactly one such header,
    compared in constant time (a second header, right or wrong, is refused)."""

    def __init__(self, token: str, state: ServingState) -> None:
        self.expected = f"Bearer {token}".encode()

        async def deny(request, context):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token",
                trailing_metadata=(("yuan-gateway", state.gateway_id),),
            )

        self._deny = deny

    async def intercept_service(self, continuation, details):
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        given = [v for k, v in (details.invocation_metadata or ()) if k == "authorization"]
        value = given[0] if len(given) == 1 else ""
        if len(given) == 1 and hmac.compare_digest(
            value.encode() if isinstance(value, str) else value, self.expected
        ):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._deny)
        return grpc.unary_stream_rpc_method_handler(self._deny_stream)

    async def _deny_stream(self, request, context):
        await self._deny(request, context)
        yield  # pragma: no cover - abort raises


def load_backend(factory: Callable[[], Backend]) -> Backend:
    """`factory()` on this (executor) thread, then this thread's OpenMP team freed: loading runs
    torch's parallel regions here, and a team left on a second thread makes libgomp stop
    spin-waiting, so every parallel region of the engine thread's steps would pay a wake-up
    (measured: a 1-stream `small` step 4.4 ms against 2.6; `skinny.release_team`)."""
    backend = factory()
    skinny.release_team()
    return backend


class GatewayServer:
    def __init__(
        self, backend_factory: Callable[[], Backend], options: ServerOptions = ServerOptions()
    ) -> None:
        self.factory, self.options = backend_factory, options
        self.state = ServingState()
        self.port: int | None = None
        self.http_port: int | None = None
        self._http_task: asyncio.Task | None = None
        self.backend: Backend | None = None
        self.error: BaseException | None = None
        self._bound = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._health = None  # the health servicer, once bound
        self._drain_started: float | None = None  # loop time the drain began

    # ---- lifecycle (called from any thread) ----------------------------------------------
    def start(self) -> int:
        """Bind and start serving health; returns the port. The backend loads in the background
        (with `bind_when_ready`, binding waits for it: this returns the configured port at once)."""
        self._thread = threading.Thread(target=self._main, name="gateway-server", daemon=True)
        self._thread.start()
        if self.options.bind_when_ready:
            return self.options.port
        if not self._bound.wait(30) or self.port is None:
            raise RuntimeError(
                f"gRPC server did not bind {self.options.host}:{self.options.port}: {self.error}"
            )
        return self.port

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until SERVING; raises the backend's start-up error, or TimeoutError."""
        if not self._ready.wait(timeout if timeout is not None else self.options.start_timeout_s):
            raise TimeoutError("gateway backend did not become ready in time")
        if self.error is not None:
            raise RuntimeError(f"gateway backend failed to start: {self.error}") from self.error

    def drain(self) -> None:
        """From now on: health NOT_SERVING, new calls UNAVAILABLE; in-flight calls go on. Returns once
        health says so (or the server thread is gone)."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()

        def begin() -> None:
            task = asyncio.ensure_future(self._begin_drain())
            task.add_done_callback(lambda _: done.set())

        self._loop.call_soon_threadsafe(begin)
        done.wait(5)

    def stop(self, grace_s: float | None = None) -> None:
        """Drain and stop; returns when the server thread has finished (backend closed)."""
        if self._loop is not None and self._stop is not None and self._thread and self._thread.is_alive():
            if grace_s is not None:
                self.options.grace_s = grace_s
            self.drain()
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()

    async def _start_http(self):
        """The OpenAI-compatible API (`gateway/openai_http.py`) on `http_port`, in this event loop. Its
        socket has SO_REUSEPORT, as grpc's has, so gateways on one node share the HTTP port too."""
        import socket

        import uvicorn

        from gateway.openai_http import OpenAIFront

        opts = self.options
        front = OpenAIFront(self.state, opts.token, opts.served_model_name)
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when it says so
        # (measured: without it every response waited out the client's 40 ms delayed ACK).
        family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((opts.host, opts.http_port))
        sock.listen(128)
        sock.setblocking(False)
        self.http_port = sock.getsockname()[1]
        tls = {"ssl_certfile": opts.tls_cert, "ssl_keyfile": opts.tls_key} if opts.tls_cert else {}
        http = uvicorn.Server(
            uvicorn.Config(front.app, log_level="warning", access_log=False, lifespan="off", **tls)
        )
        self._http_task = asyncio.ensure_future(http.serve(sockets=[sock]))
        return http

    async def _begin_drain(self) -> None:
        if self._drain_started is None:
            self._drain_started = asyncio.get_running_loop().time()
        self.state.draining = True
        if self._health is not None:
            for name in ("", SERVICE):
                await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    @property
    def serving(self) -> bool:
        """Started, with its backend up, and not draining."""
        return self._ready.is_set() and self.error is None and not self.state.draining

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # ---- the server thread ---------------------------------------------------------------
    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as e:  # reported through start()/wait_ready()
            self.error = e
            self._bound.set()
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        opts = self.options
        self._stop = asyncio.Event()
        interceptors = [_BearerAuth(opts.token, self.state)] if opts.token else []
        server = grpc.aio.server(interceptors=interceptors)
        add_to_server(YuanServingServicer(self.state), server)
        health = self._health = self.state.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            [SERVICE, reflection.SERVICE_NAME, "grpc.health.v1.Health"], server
        )
        address = f"{opts.host}:{opts.port}"
        if opts.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(opts.tls_key).read_bytes(), Path(opts.tls_cert).read_bytes())]
            )
            add_port = lambda: server.add_secure_port(address, creds)  # noqa: E731
        else:
            add_port = lambda: server.add_insecure_port(address)  # noqa: E731
        for name in ("", SERVICE):
            await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.get_running_loop()
        control = http = None

        async def bind():  # gRPC, then HTTP (when asked for): before the backend loads, or after
            self.port = add_port()
            await server.start()
            started = await self._start_http() if opts.http_port else None
            self._bound.set()
            return started

        if not opts.bind_when_ready:
            http = await bind()
        try:
            self.backend = await loop.run_in_executor(None, load_backend, self.factory)
            gateway = Gateway(self.backend.engine)
            self.state.tokenizer, self.state.info = self.backend.tokenizer, self.backend.info
            self.state.gateway_id = self.backend.gateway_id or self.state.gateway_id
            self.state.gateway = self.state.metrics.gateway = gateway
            if opts.bind_when_ready:
                http = await bind()
            if self.backend.control is not None:
                control = asyncio.ensure_future(self.backend.control(gateway, self.state))
            await self.state.set_available(self.state.available)
        except BaseException as e:
            self.error = e
        finally:
            self._ready.set()
            self._bound.set()
        await self._stop.wait()
        # Drain: health says NOT_SERVING and new calls get UNAVAILABLE while the port stays open;
        # in-flight calls get the grace period to finish, then are cancelled in the engine, which
        # ends each with its final message, and then the server stops.
        await self._begin_drain()
        if control is not None:  # the control loop ends here, not with the event loop (a pending task
            control.cancel()  # at the loop's close is left behind): a report in flight is abandoned
            await asyncio.wait([control], timeout=CANCEL_WAIT_S)
        deadline = self._drain_started + opts.grace_s
        while self.state.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.state.inflight and self.state.gateway is not None:
            self.state.gateway.cancel_all()
            cancel_deadline = loop.time() + CANCEL_WAIT_S
            while self.state.inflight and loop.time() < cancel_deadline:
                await asyncio.sleep(0.02)
        await server.stop(0.5)  # let final statuses go out
        if http is not None:
            http.should_exit = True
            await asyncio.wait([self._http_task], timeout=5)
        if self.state.gateway is not None:  # its engine thread ends after the step it is in
            await loop.run_in_executor(None, self.state.gateway.close, CLOSE_WAIT_S)
        if self.backend is not None:
            await loop.run_in_executor(None, self.backend.close)
