"""One load client process of the crash loop (tests/crashloop.py starts several a round).

    crashloop_proc.py --target HOST:PORT [--target ...] [--failover] --log FILE ...

It logs in (odd clients as `worker`), says `ready` on stdout and runs the load
(crashloop_client.LoadClient; with --failover, crashloop_failover.FailoverClient over
every target) until its server is gone, its time is up or its operations are done.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path

import grpc
from crashloop_client import LoadClient, ServerGone, Stub
from crashloop_failover import FailoverClient


def client_main(args: argparse.Namespace) -> int:
    """A client process: log in, say `ready` on stdout, run the load until it ends."""
    rng = random.Random(args.seed)
    user = "worker" if args.client % 2 else "admin"
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(Path(args.log).open("w", encoding="utf-8"))
        rest = (user, rng, out, args.round, args.client, args.session_ttl)
        client: LoadClient
        if args.failover:
            client = FailoverClient(args.target, *rest)
            stack.callback(client.close)
        else:
            channel = stack.enter_context(grpc.insecure_channel(args.target[0]))
            client = LoadClient(Stub(channel), *rest)
        try:
            client.login()
        except ServerGone:  # the server died before the load began
            print("ready", flush=True)
            return 0
        print("ready", flush=True)
        client.run(args.max_ops, time.monotonic() + args.max_seconds)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one crash-loop load client")
    parser.add_argument("--target", action="append", required=True)
    parser.add_argument("--failover", action="store_true", help="move to the next target")
    parser.add_argument("--log", required=True)
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--client", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--session-ttl", type=float, required=True)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--max-ops", type=int, default=100_000)
    return client_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
