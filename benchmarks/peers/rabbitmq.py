"""The e2e workload on RabbitMQ: durable queue, persistent messages, publisher confirms.

Publishing uses pika's asynchronous connection so that a window of 100 publishes is in
flight, as with the other systems; the blocking adapter would wait for each confirm alone
and understate RabbitMQ. Consuming is manual ack with prefetch 100, acked per 100
(``multiple=True``).
"""

from __future__ import annotations

import time
from typing import Any

import pika
from pika.spec import Basic

from benchmarks.peers.common import E2EResult, E2ESpec

PERSISTENT = 2
"""AMQP delivery_mode for a message that is written to disk."""


class _ConfirmedPublisher:
    """Keeps at most ``window`` unconfirmed publishes; stops at n confirms or the deadline."""

    def __init__(self, params: Any, spec: E2ESpec, deadline: float) -> None:
        self.params = params
        self.spec = spec
        self.deadline = deadline
        self.body = b"x" * spec.element_size
        self.props = pika.BasicProperties(delivery_mode=PERSISTENT)
        self.sent = 0
        self.unconfirmed: set[int] = set()
        self.nacked = 0
        self.elapsed = 0.0
        self.error = ""
        self._t0 = 0.0
        self._channel: Any = None
        self._conn: Any = None

    @property
    def confirmed(self) -> int:
        return self.sent - len(self.unconfirmed) - self.nacked

    def run(self) -> None:
        self._conn = pika.SelectConnection(
            self.params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=lambda _c, _r: self._conn.ioloop.stop(),
        )
        self._conn.ioloop.call_later(max(0.1, self.deadline - time.monotonic()), self._finish)
        self._conn.ioloop.start()

    def _on_open_error(self, _conn: Any, err: Exception) -> None:
        self.error = f"connect: {err}"
        self._conn.ioloop.stop()

    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_ready)

    def _on_ready(self, _frame: Any) -> None:
        self._t0 = time.perf_counter()
        self._pump()

    def _pump(self) -> None:
        while self.sent < self.spec.n and len(self.unconfirmed) < self.spec.in_flight:
            self._channel.basic_publish("", self.spec.name, self.body, properties=self.props)
            self.sent += 1
            self.unconfirmed.add(self.sent)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = int(method.delivery_tag)
        done = {t for t in self.unconfirmed if t <= tag} if method.multiple else {tag}
        self.unconfirmed -= done
        if isinstance(method, Basic.Nack):
            self.nacked += len(done)
        if self.sent >= self.spec.n and not self.unconfirmed:
            self._finish()
        else:
            self._pump()

    def _finish(self) -> None:
        if not self.elapsed and self._t0:
            self.elapsed = time.perf_counter() - self._t0
        if self._conn is not None and self._conn.is_open:
            self._conn.close()


def run(spec: E2ESpec) -> E2EResult:
    res = E2EResult(status="ok")
    deadline = time.monotonic() + spec.timeout_s
    params = pika.ConnectionParameters(
        host=spec.host,
        port=spec.port,
        credentials=pika.PlainCredentials(spec.username or "guest", spec.password or "guest"),
    )
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        ch.queue_declare(spec.name, durable=True)
        ch.queue_purge(spec.name)
        pub = _ConfirmedPublisher(params, spec, deadline)
        pub.run()
        if pub.error:
            return E2EResult(status="error", note=pub.error)
        res.produced, res.produce_s = pub.confirmed, pub.elapsed
        if pub.nacked:
            res.note = f"{pub.nacked} publishes nacked"
        ch.basic_qos(prefetch_count=spec.in_flight)
        t1 = time.perf_counter()
        unacked = 0
        for method, _props, _body in ch.consume(spec.name, inactivity_timeout=0.5):
            if method is not None:
                unacked += 1
                if unacked == spec.in_flight or res.consumed + unacked >= res.produced:
                    ch.basic_ack(method.delivery_tag, multiple=True)
                    res.consumed += unacked
                    unacked = 0
            if res.consumed >= res.produced or time.monotonic() >= deadline:
                break
        res.consume_s = time.perf_counter() - t1
        ch.cancel()
        ch.queue_delete(spec.name)
    finally:
        conn.close()
    return res
