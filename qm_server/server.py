"""Builds and runs the gRPC server: servicer, health, reflection, options, drain."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass

import grpc
from grpc_reflection.v1alpha import reflection

from qm_server import handlers, health
from qm_server.auth import KeyPair, PasswordHasher, random_password
from qm_server.challenges import shared_challenges
from qm_server.config import ServerConfig
from qm_server.datadir import (
    INITIAL_PASSWORD_FILE,
    check_database_belongs,
    check_key_belongs,
    make_files_private,
)
from qm_server.engine import Engine
from qm_server.fsutil import ensure_dir, lock_data_dir, write_private_file
from qm_server.metrics import MetricsAddressError, ServerMetrics, parse_address
from qm_server.server_key import load_server_key
from qm_server.servicer import QueueManagerServicer
from qm_server.store.backends import open_store
from qm_server.store.base import Store, UserRecord

log = logging.getLogger(__name__)

SERVICE_NAME = handlers.SERVICE.full_name
HEALTH_NAMES = ("", SERVICE_NAME)
"""What the health service answers for: the server as a whole, and the one service."""


class _ClientGoneFilter(logging.Filter):
    """grpcio logs an ERROR with a traceback when it cannot send an answer because the
    client went away. That is the client's doing, not a server fault: keep one line at
    debug level instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "ExecuteBatchError" not in message:
            return True
        log.debug("a client left before its answer was sent: %s", message.splitlines()[0])
        return False


_GRPC_LOG = logging.getLogger("grpc._cython.cygrpc")
if not any(isinstance(f, _ClientGoneFilter) for f in _GRPC_LOG.filters):
    _GRPC_LOG.addFilter(_ClientGoneFilter())


class BindError(RuntimeError):
    """The listen address could not be bound (taken, or not an address of this host)."""


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    keepalive = config.keepalive
    streams = config.max_streams_per_connection
    return [
        *([("grpc.max_concurrent_streams", streams)] if streams else []),
        # A second server on a taken port must fail, not silently share it.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.keepalive_time_ms", keepalive.time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive.min_client_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", keepalive.max_ping_strikes),
    ]


LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0]
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Add the listening port, with TLS when configured; plaintext only where allowed.

    Every way of failing (a taken port, a bad address, a bad TLS setup) is a BindError.
    """
    try:
        port = _add_port(server, config)
    except (RuntimeError, OSError) as exc:
        raise BindError(f"cannot listen on {config.listen}: {exc}") from None
    if port == 0:
        raise BindError(f"cannot listen on {config.listen}")
    return port


def _add_port(server: grpc.aio.Server, config: ServerConfig) -> int:
    tls = config.tls
    if tls.enabled:
        if tls.key is None or tls.cert is None:
            raise BindError("--tls-cert and --tls-key go together")
        credentials = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
            require_client_auth=tls.client_ca is not None,
        )
        return server.add_secure_port(config.listen, credentials)
    if tls.client_ca is not None or tls.key is not None:
        raise BindError("--tls-client-ca and --tls-key need --tls-cert")
    if not is_loopback(config.listen):
        if not config.allow_plaintext:
            raise BindError(
                f"refusing plaintext on {config.listen}, which is not a loopback address: "
                "give --tls-cert and --tls-key, or --allow-plaintext"
            )
        log.warning("serving PLAINTEXT on %s: tokens and data cross the network", config.listen)
    return server.add_insecure_port(config.listen)


class QueueManagerServer:
    """One running server: store, engine, gRPC server and health, started and stopped as one."""

    def __init__(self, config: ServerConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or open_store(config)
        self.port = 0
        self.keys: KeyPair | None = None
        self.engine: Engine | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.HealthService(HEALTH_NAMES)
        self._store_healthy = True  # as the store last reported
        self._stopping = False
        self._stopped = asyncio.Event()
        self._health_update: asyncio.Task[None] | None = None
        self._data_dir_lock: int | None = None  # the descriptor holding qm.lock
        self.metrics: ServerMetrics | None = None  # with --metrics-listen only
        self.failed_to_stop = False

    async def start(self) -> int:
        """Lock the data directory, open the store, bind, and serve; returns the port."""
        if self.config.metrics_listen:  # a malformed address: refused before any file
            try:
                parse_address(self.config.metrics_listen)
            except MetricsAddressError as exc:
                raise BindError(str(exc)) from None
        ensure_dir(self.config.data_dir)
        self._data_dir_lock = lock_data_dir(self.config.data_dir)
        try:
            return await self._start_locked()
        except BaseException:
            self._unlock_data_dir()
            raise

    def _unlock_data_dir(self) -> None:
        if self._data_dir_lock is not None:
            os.close(self._data_dir_lock)
            self._data_dir_lock = None

    async def _start_locked(self) -> int:
        config = self.config
        if not config.store:  # the embedded database and its key share the directory
            check_database_belongs(config.data_dir, config.new_database)
            check_key_belongs(config.data_dir, config.new_key)
        make_files_private(config.data_dir)
        # From the first moment the store can fail: a failure reported before the server
        # serves must still turn it NOT_SERVING once it does.
        self.store.set_health_listener(self._on_store_health)
        try:
            await self.store.open()
            # Only once the database exists: a key without one means it was lost. Servers
            # sharing a store share the key it holds (server_key.py).
            self.keys = await load_server_key(self.store, config.data_dir, config.auth.rsa_bits)
            await self._ensure_admin()
            return await self._serve(self.keys)
        except BaseException:
            await self.store.close()
            raise

    async def _serve(self, keys: KeyPair) -> int:
        """Engine, gRPC server and health, over an open store."""
        config = self.config
        self.engine = Engine(
            self.store,
            keys,
            session_ttl_s=config.session_ttl_s,
            limits=config.limits,
            auth=config.auth,
            challenges=await shared_challenges(self.store, config.auth.challenge_ttl_s, time.time),
        )
        server = grpc.aio.server(
            options=grpc_options(config),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        if config.metrics_listen:
            self.metrics = ServerMetrics(self.engine, self.store, lambda: self._store_healthy)
        calls = self.metrics.calls if self.metrics is not None else None
        servicer = QueueManagerServicer(self.engine, calls, config.max_request_bytes)
        handlers.register(servicer, server)
        self._health.add_to(server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        port = bind(server, config)
        if self.metrics is not None:
            try:
                self.metrics.serve(config.metrics_listen)
            except MetricsAddressError as exc:
                raise BindError(str(exc)) from None
        self.port = port
        self._server = server
        try:
            await self.engine.start()
            await server.start()
        except BaseException:
            await self._stop_metrics()
            raise
        await self._set_serving(self._store_healthy)
        log.info(
            "serving %s on %s (port %d), data directory %s, key fingerprint %s",
            "TLS" if config.tls.enabled else "plaintext",
            f"{config.listen.rsplit(':', 1)[0]}:{port}",
            port,
            config.data_dir.resolve(),
            keys.fingerprint,
        )
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let running ones finish, close the store."""
        if self._server is None or self._stopping:
            return
        self._stopping = True
        try:
            if self._health_update is not None:
                await self._health_update
            await self._health.drain()  # NOT_SERVING; Watch streams end, not at the grace
            assert self.engine is not None
            self.engine.begin_drain()
            await self._server.stop(self.config.grace_s if grace_s is None else grace_s)
            await self.engine.stop()
            await self.store.close()
            log.info("stopped; store closed")
        except BaseException:
            # Whoever waits for the end (qm-server's main, after a SIGTERM) must not wait
            # for ever: it ends all the same, with a failure to report.
            log.exception("the shutdown failed")
            self.failed_to_stop = True
            raise
        finally:
            await self._stop_metrics()
            self._unlock_data_dir()
            self._stopped.set()

    async def _stop_metrics(self) -> None:
        # Its HTTP server notices a shutdown within half a second: not on the loop.
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)

    async def wait_stopped(self) -> None:
        """Until stop() has finished: drained, store closed."""
        await self._stopped.wait()

    def _on_store_health(self, healthy: bool) -> None:
        self._store_healthy = healthy
        if self._server is not None and not self._stopping:
            # Keep a reference: the loop holds tasks only weakly.
            self._health_update = asyncio.get_running_loop().create_task(self._set_serving(healthy))

    async def _set_serving(self, serving: bool) -> None:
        status = health.SERVING if serving else health.NOT_SERVING
        reason = "" if serving else self.store.unhealthy_reason()
        for service in HEALTH_NAMES:
            await self._health.set(service, status, reason)

    async def _ensure_admin(self) -> None:
        """First start: user admin, with QM_ADMIN_PASSWORD or a random password kept 0600."""
        if await self.store.count_users() > 0:
            return
        password = self.config.admin_password or os.environ.get("QM_ADMIN_PASSWORD")
        generated = not password
        if not password:
            password = random_password()
        hasher = PasswordHasher.from_settings(self.config.auth)
        hashed = await asyncio.get_running_loop().run_in_executor(None, hasher.hash, password)
        if generated:
            path = self.config.data_dir / INITIAL_PASSWORD_FILE
            write_private_file(path, (password + "\n").encode())
            print(f"qm-server: created user admin with password {password} (also in {path})")
            log.warning("created user admin; its generated password is in %s", path)
        await self.store.create_user(UserRecord("admin", hashed, is_admin=True))


@dataclass
class ServerThread:
    """A server on its own event loop in a background thread: for tests and embedding.

    Tests call the server through real channels while their own code stays synchronous.
    """

    config: ServerConfig
    port: int = 0
    server: QueueManagerServer | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            self.server = QueueManagerServer(self.config)
            try:
                self.port = loop.run_until_complete(self.server.start())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_until_complete(self.server.wait_stopped())
            # As asyncio.run does, let what is still scheduled (grpc's own tasks) finish
            # before the loop closes, or grpc's poller calls into a closed loop.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="qm-server-loop", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        if self._loop is None or self.server is None or self._thread is None:
            return
        if self._loop.is_closed():  # already stopped
            return
        future = asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), self._loop)
        future.result(timeout=30)
        self._thread.join(timeout=30)
