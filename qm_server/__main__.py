"""`qm-server`: serve, or manage users in a data directory.

qm-server [--listen HOST:PORT] [--data-dir DIR] [--session-ttl SECONDS] ...
qm-server user add|passwd NAME --password-stdin [--data-dir DIR]
qm-server user remove NAME [--data-dir DIR]
qm-server user list [--data-dir DIR]
qm-server user grant|revoke NAME ACTIONS KIND PATTERN [--data-dir DIR]
qm-server check [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import sqlite3
import sys
from pathlib import Path

from qm_server import errors
from qm_server.auth import PasswordHasher
from qm_server.config import AuthSettings, KeepaliveSettings, Limits, ServerConfig, TlsSettings
from qm_server.datadir import NEW_DATABASE_FLAG, missing_database
from qm_server.fsutil import DataDirInUse, DataDirRefused
from qm_server.permissions import KINDS, Grant
from qm_server.server import BindError, QueueManagerServer
from qm_server.store import sqlite_file
from qm_server.store.base import UserRecord
from qm_server.store.sqlite_file import SYNCHRONOUS, DatabaseDamaged

# Exit statuses of `qm-server check`.
CHECK_OK, CHECK_DAMAGED, CHECK_FAILED = 0, 1, 2

DEFAULTS = ServerConfig()
LIMIT_DEFAULTS = Limits()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qm-server", description="queue manager: durable work queues and maps over gRPC"
    )
    parser.add_argument("--listen", default=DEFAULTS.listen, help="HOST:PORT (port 0: any free)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULTS.data_dir)
    parser.add_argument(
        "--session-ttl",
        type=float,
        default=DEFAULTS.session_ttl_s,
        metavar="SECONDS",
        help="idle time after which a session expires and its messages are released",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULTS.grace_s,
        metavar="SECONDS",
        help="how long calls in progress may finish at shutdown",
    )
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    parser.add_argument(
        "--durability",
        choices=sorted(SYNCHRONOUS),
        default=DEFAULTS.durability,
        help="full: fsync before every answer (survives power loss); process-crash: "
        "faster, survives kill -9 but may lose the last answers on power loss",
    )
    parser.add_argument(
        NEW_DATABASE_FLAG,
        action="store_true",
        help="start with a new, empty database although the data directory's key shows "
        "that it held one (which is gone)",
    )
    parser.add_argument(
        "--start-check-seconds",
        type=float,
        default=DEFAULTS.start_check_s,
        metavar="SECONDS",
        help="check the database's integrity at start for this long at most (0: skip)",
    )
    parser.add_argument(
        "--disk-reserve-bytes",
        type=int,
        default=DEFAULTS.disk_reserve_bytes,
        help="disk space set aside so that a full disk can still be drained (0: none)",
    )
    parser.add_argument("--max-element-bytes", type=int, default=LIMIT_DEFAULTS.max_element_bytes)
    parser.add_argument("--max-batch", type=int, default=LIMIT_DEFAULTS.max_batch)
    parser.add_argument("--max-page", type=int, default=LIMIT_DEFAULTS.max_page)
    parser.add_argument("--max-queues", type=int, default=LIMIT_DEFAULTS.max_queues)
    parser.add_argument("--max-maps", type=int, default=LIMIT_DEFAULTS.max_maps)
    parser.add_argument("--max-wait-ms", type=int, default=LIMIT_DEFAULTS.max_wait_ms)
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULTS.max_request_bytes)
    parser.add_argument("--max-concurrent-rpcs", type=int, default=None)
    parser.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=DEFAULTS.max_streams_per_connection,
        help="HTTP/2 streams per connection (default: unlimited)",
    )
    parser.add_argument(
        "--max-map-get-all-bytes", type=int, default=LIMIT_DEFAULTS.max_map_get_all_bytes
    )
    parser.add_argument(
        "--max-response-bytes",
        type=int,
        default=LIMIT_DEFAULTS.max_response_bytes,
        help="PullElements, Subscribe pushes and MapGetList pages stop adding entries here",
    )
    parser.add_argument("--max-sessions", type=int, default=LIMIT_DEFAULTS.max_sessions)
    parser.add_argument("--max-waiting-polls", type=int, default=LIMIT_DEFAULTS.max_waiting_polls)
    parser.add_argument("--max-subscriptions", type=int, default=LIMIT_DEFAULTS.max_subscriptions)
    parser.add_argument(
        "--min-ping-interval-ms",
        type=int,
        default=KeepaliveSettings().min_client_ping_interval_ms,
        help="clients pinging more often than this get GOAWAY (too_many_pings)",
    )
    parser.add_argument(
        "--login-failures",
        type=int,
        default=AuthSettings().failures_before_backoff,
        help="failed logins per user or host before backoff starts",
    )
    parser.add_argument(
        "--max-concurrent-hashes",
        type=int,
        default=AuthSettings().max_concurrent_hashes,
        help="password hashes computed at once",
    )
    parser.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA"
    )
    parser.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="allow plaintext on a non-loopback address (tokens cross the network in clear)",
    )
    parser.add_argument(
        "--rsa-bits",
        type=int,
        default=AuthSettings().rsa_bits,
        help="size of the key created on first start",
    )
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command")
    user = commands.add_parser("user", help="manage users in --data-dir").add_subparsers(
        dest="action", required=True
    )
    for action in ("add", "passwd"):
        sub = user.add_parser(action)
        sub.add_argument("name")
        sub.add_argument("--password-stdin", action="store_true", help="read it from stdin")
        sub.add_argument("--admin", action="store_true", help="make the user an admin")
        sub.add_argument("--data-dir", type=Path, dest="user_data_dir")
    remove = user.add_parser("remove")
    remove.add_argument("name")
    remove.add_argument("--data-dir", type=Path, dest="user_data_dir")
    listing = user.add_parser("list", help="users, their role and their grants")
    listing.add_argument("--data-dir", type=Path, dest="user_data_dir")
    for action in ("grant", "revoke"):
        sub = user.add_parser(action, help=f"{action} ACTIONS on KIND names matching PATTERN")
        sub.add_argument("name")
        sub.add_argument("actions", help="read, write, manage, or a comma-separated list")
        sub.add_argument("kind", choices=KINDS)
        sub.add_argument("pattern", help="a glob: a name, 'jobs.*', or '*' for all")
        sub.add_argument("--data-dir", type=Path, dest="user_data_dir")
    check = commands.add_parser(
        "check", help="check the whole database for damage (PRAGMA integrity_check)"
    )
    check.add_argument("--data-dir", type=Path, dest="user_data_dir")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        data_dir=args.data_dir,
        listen=args.listen,
        session_ttl_s=args.session_ttl,
        durability=args.durability,
        start_check_s=args.start_check_seconds,
        new_database=args.new_database,
        disk_reserve_bytes=args.disk_reserve_bytes,
        grace_s=args.grace,
        max_request_bytes=args.max_request_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_streams_per_connection=args.max_streams_per_connection,
        tls=TlsSettings(args.tls_cert, args.tls_key, args.tls_client_ca),
        allow_plaintext=args.allow_plaintext,
        keepalive=KeepaliveSettings(min_client_ping_interval_ms=args.min_ping_interval_ms),
        limits=Limits(
            max_element_bytes=args.max_element_bytes,
            max_batch=args.max_batch,
            max_page=args.max_page,
            max_queues=args.max_queues,
            max_maps=args.max_maps,
            max_wait_ms=args.max_wait_ms,
            max_sessions=args.max_sessions,
            max_map_get_all_bytes=args.max_map_get_all_bytes,
            max_response_bytes=args.max_response_bytes,
            max_waiting_polls=args.max_waiting_polls,
            max_subscriptions=args.max_subscriptions,
        ),
        auth=AuthSettings(
            rsa_bits=args.rsa_bits,
            failures_before_backoff=args.login_failures,
            max_concurrent_hashes=args.max_concurrent_hashes,
        ),
    )


async def serve(config: ServerConfig, port_file: Path | None) -> int:
    server = QueueManagerServer(config)
    try:
        port = await server.start()
    except (BindError, DataDirInUse, DataDirRefused, errors.Unavailable) as exc:
        print(f"qm-server: {exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []  # a reference keeps the task alive
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stopping.append(loop.create_task(server.stop())))
    if port_file is not None:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(port_file)
    await server.wait_stopped()
    return 1 if server.failed_to_stop else 0


def read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
    else:
        raise SystemExit("qm-server: give --password-stdin, or run on a terminal to be asked")
    if not password:
        raise SystemExit("qm-server: the password is empty")
    return password


def existing_database(args: argparse.Namespace) -> Path | None:
    """The database of --data-dir, or None (said on stderr) if there is none: a command
    that made one would report success on a mistyped directory."""
    data_dir: Path = args.user_data_dir or args.data_dir
    why = missing_database(data_dir)
    if why is None:
        return data_dir / sqlite_file.DB_FILE
    print(
        f"qm-server: no database in {data_dir} ({sqlite_file.DB_FILE} {why}); "
        "check --data-dir, or start qm-server there once to create one",
        file=sys.stderr,
    )
    return None


def manage_users(args: argparse.Namespace) -> int:
    path = existing_database(args)
    if path is None:
        return 2
    # Ask for the password before taking the database's write lock.
    password = read_password(args) if args.action in ("add", "passwd") else ""
    try:
        conn = sqlite_file.connect(path, create=False)
        try:
            with sqlite_file.transaction(conn):
                return change_users(conn, args, password)
        finally:
            conn.close()
    except DatabaseDamaged as exc:
        print(f"qm-server: {exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:  # a full disk, a read-only file, a corrupt page
        if sqlite_file.is_corruption(exc):
            print(f"qm-server: {sqlite_file.damaged(path, [str(exc)])}", file=sys.stderr)
        else:
            print(f"qm-server: nothing changed, {path}: {exc}", file=sys.stderr)
        return 2


def check_database(args: argparse.Namespace) -> int:
    """`qm-server check`: the full integrity check, read-only; best with the server stopped
    (a running server's writes are not seen past the check's start)."""
    path = existing_database(args)
    if path is None:
        return CHECK_FAILED
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        print(f"qm-server: cannot open {path}: {exc}", file=sys.stderr)
        return CHECK_FAILED
    try:
        problems = sqlite_file.check_integrity(conn)
    except sqlite3.Error as exc:
        print(f"qm-server: cannot check {path}: {exc}", file=sys.stderr)
        return CHECK_FAILED
    finally:
        conn.close()
    assert problems is not None  # no deadline: the check ran to its end
    if not problems:
        print(f"{path}: ok")
        return CHECK_OK
    for problem in problems:
        print(f"{path}: {problem}")
    print(f"qm-server: {sqlite_file.damaged(path, problems)}", file=sys.stderr)
    return CHECK_DAMAGED


def change_users(conn: sqlite3.Connection, args: argparse.Namespace, password: str) -> int:
    """One user command, inside one transaction."""
    if args.action == "list":
        permissions = sqlite_file.load_permissions(conn)
        for record in sqlite_file.list_users(conn):
            grants = "; ".join(str(g) for g in permissions[record.name].grants)
            role = " (admin)" if record.is_admin else ""
            print(f"{record.name}{role}{': ' + grants if grants else ''}")
        return 0
    if args.action in ("grant", "revoke"):
        return change_grants(conn, args)
    if args.action == "remove":
        if not sqlite_file.delete_user(conn, args.name):
            print(f"qm-server: no user {args.name!r}", file=sys.stderr)
            return 1
        print(f"removed user {args.name}")
        return 0
    existing = sqlite_file.get_user(conn, args.name)
    if args.action == "add" and existing is not None:
        print(f"qm-server: user {args.name!r} already exists", file=sys.stderr)
        return 1
    if args.action == "passwd" and existing is None:
        print(f"qm-server: no user {args.name!r}", file=sys.stderr)
        return 1
    hashed = PasswordHasher.from_settings(AuthSettings()).hash(password)
    is_admin = args.admin or (existing is not None and existing.is_admin)
    sqlite_file.put_user(conn, UserRecord(args.name, hashed, is_admin))
    print(f"{'added' if args.action == 'add' else 'changed password of'} user {args.name}")
    return 0


def change_grants(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    if sqlite_file.get_user(conn, args.name) is None:
        print(f"qm-server: no user {args.name!r}", file=sys.stderr)
        return 1
    try:
        grants = [Grant(a.strip(), args.kind, args.pattern) for a in args.actions.split(",")]
    except ValueError as exc:
        print(f"qm-server: {exc}", file=sys.stderr)
        return 1
    for grant in grants:
        if args.action == "grant":
            sqlite_file.add_grant(conn, args.name, grant)
            print(f"granted {grant} to {args.name}")
        elif sqlite_file.remove_grant(conn, args.name, grant):
            print(f"revoked {grant} from {args.name}")
        else:
            print(f"{args.name} did not hold {grant}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "user":
        return manage_users(args)
    if args.command == "check":
        return check_database(args)
    return asyncio.run(serve(config_from_args(args), args.port_file))


if __name__ == "__main__":
    sys.exit(main())
