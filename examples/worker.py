"""Consume a queue: ack what succeeds, nack what fails, park what keeps failing.

    QM_SERVER=localhost:50051 QM_USER=admin QM_PASSWORD=... \
        python examples/worker.py jobs --results squares

The job here squares integers and stores the result in a map; anything that is not an
integer fails. A failed message is nacked, so the server hands it out again (to this or
another worker) with its delivery_count raised. After --max-deliveries attempts it is
moved to the dead-letter queue ``<queue>.dead`` instead, so one bad message cannot keep a
worker busy forever (SQS calls this a redrive policy).

Delivery is at least once: if this worker dies mid-job, the message comes back when its
session ends, so a job must tolerate running twice. Writing ``results[element]`` is such a
job: doing it again writes the same value.

Stops on Ctrl-C or SIGTERM once the message in hand (or the long poll under way) is
finished, or, with --idle-exit, when no message came within that many seconds (a server
that restarts meanwhile is waited for: a long poll it cuts short raises Unavailable, never
looks like an empty queue).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

from qm_client import Message, QMap, QueueManagerClient, SessionLoss, Unavailable

log = logging.getLogger("worker")


def square(element: str) -> str:
    """The job. Raises ValueError for input it cannot handle."""
    return str(int(element) ** 2)


def handle(qm: QueueManagerClient, message: Message, results: QMap, max_deliveries: int) -> None:
    try:
        result = square(message.element)
    except ValueError as error:
        if message.delivery_count >= max_deliveries:
            dead = f"{message.queue}.dead"
            qm.new_queue(dead, exist_ok=True)
            qm.add(dead, message.element)
            message.ack()
            log.warning(
                "parked %r in %s after %d attempts: %s",
                message.element,
                dead,
                message.delivery_count,
                error,
            )
        else:
            message.nack()
            log.info(
                "failed %r (attempt %d), will retry: %s",
                message.element,
                message.delivery_count,
                error,
            )
        return
    results[message.element] = result
    message.ack()
    log.info("done %r -> %s", message.element, result)


def on_session_lost(loss: SessionLoss) -> None:
    # The client already logged in again; the jobs it held went back to the queue and
    # will be redelivered, to us or to another worker.
    log.warning("session lost; %d message(s) released for redelivery", len(loss.released))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("queue")
    parser.add_argument("--results", default="results", help="map to write results into")
    parser.add_argument("--max-deliveries", type=int, default=3)
    parser.add_argument("--wait", type=float, default=5.0, help="long-poll seconds")
    parser.add_argument(
        "--idle-exit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit once the queue stayed empty this long",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    wait = args.wait if args.idle_exit is None else min(args.wait, args.idle_exit)
    with QueueManagerClient(
        os.environ.get("QM_SERVER", "localhost:50051"),
        os.environ["QM_USER"],
        os.environ["QM_PASSWORD"],
        on_session_lost=on_session_lost,
    ) as qm:
        results = qm.map(args.results)
        while not stop.is_set():
            try:
                message = qm.poll(args.queue, wait=wait)
            except Unavailable as error:
                # The server is restarting or its store failing (the client has already
                # tried again): not an empty queue, so not a reason to exit.
                log.warning("server unavailable, polling again in a second: %s", error)
                stop.wait(1.0)
                continue
            if message is None:
                if args.idle_exit is not None:
                    log.info("no message in %s within %g s, exiting", args.queue, wait)
                    break
                continue
            handle(qm, message, results, args.max_deliveries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
