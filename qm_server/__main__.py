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
from qm_server.config import AuthSettings, ServerConfig
from qm_server.datadir import missing_database
from qm_server.flags import add_setting_flags, settings_from_args
from qm_server.fsutil import DataDirInUse, DataDirRefused
from qm_server.permissions import KINDS, Grant
from qm_server.server import BindError, QueueManagerServer
from qm_server.store import sqlite_file
from qm_server.store.base import UserRecord
from qm_server.store.sqlite_file import DatabaseDamaged

# Exit statuses of `qm-server check`.
CHECK_OK, CHECK_DAMAGED, CHECK_FAILED = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qm-server", description="queue manager: durable work queues and maps over gRPC"
    )
    add_setting_flags(parser)
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving")
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
    return settings_from_args(args, ServerConfig)


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
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "user":
        return manage_users(args)
    if args.command == "check":
        return check_database(args)
    try:
        config = config_from_args(args)
    except ValueError as exc:  # limits that contradict each other
        parser.error(str(exc))
    return asyncio.run(serve(config, args.port_file))


if __name__ == "__main__":
    sys.exit(main())
