"""Put work on a queue.

    QM_SERVER=localhost:50051 QM_USER=admin QM_PASSWORD=... \
        python examples/producer.py jobs 1 2 3
    seq 100 | python examples/producer.py jobs

Creates the queue when it is missing and adds every element in one atomic call, so a
failure leaves none of them half-added. Prints the ids the server gave them.
"""

from __future__ import annotations

import argparse
import os
import sys

from qm_client import QueueManagerClient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("queue")
    parser.add_argument("elements", nargs="*", help="default: one element per stdin line")
    args = parser.parse_args()
    elements = args.elements or sys.stdin.read().splitlines()
    if not elements:
        parser.error("nothing to add")

    with QueueManagerClient(
        os.environ.get("QM_SERVER", "localhost:50051"),
        os.environ["QM_USER"],
        os.environ["QM_PASSWORD"],
    ) as qm:
        qm.new_queue(args.queue, exist_ok=True)
        for message_id in qm.add_all(args.queue, elements):
            print(message_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
