"""`qm-server`: serve, or manage users in a data directory.

qm-server [--listen HOST:PORT] [--data-dir DIR] [--session-ttl SECONDS] ...
qm-server user add|passwd NAME --password-stdin [--data-dir DIR]
qm-server user remove NAME [--data-dir DIR]
qm-server user list [--data-dir DIR]
qm-server user grant|revoke NAME ACTIONS KIND PATTERN [--data-dir DIR]
qm-server check [--data-dir DIR]
qm-server backup DEST [--data-dir DIR]
qm-server --version

Every flag can also come from its environment variable (QM_LISTEN, QM_DATA_DIR, ...; see
flags.environment_defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
import sys
from pathlib import Path

from qm_server import __version__, errors, logs
from qm_server.backup import add_backup_command, run_backup
from qm_server.config import ServerConfig
from qm_server.flags import ENV_RULE, add_setting_flags, environment_defaults, settings_from_args
from qm_server.fsutil import DataDirInUse, DataDirRefused
from qm_server.store import sqlite_file, sqlite_users
from qm_server.user_commands import add_user_commands, manage_users

# Exit statuses of `qm-server check`.
CHECK_OK, CHECK_DAMAGED, CHECK_FAILED = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qm-server",
        description="queue manager: durable work queues and maps over gRPC. " + ENV_RULE,
    )
    parser.add_argument("--version", action="version", version=f"qm-server {__version__}")
    add_setting_flags(parser)
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    parser.add_argument("--log-level", default="INFO", help="Python logging level")
    environment_defaults(parser)
    commands = parser.add_subparsers(dest="command")
    add_user_commands(commands)
    check = commands.add_parser(
        "check", help="check the whole database for damage (PRAGMA integrity_check)"
    )
    check.add_argument("--data-dir", type=Path, dest="user_data_dir")
    add_backup_command(commands)
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return settings_from_args(args, ServerConfig)


SERVER_EXTRA = "serving needs the server extra: pip install 'queue-manager[server]'"


async def serve(config: ServerConfig, port_file: Path | None) -> int:
    # Imported here rather than at the top, so that in a client-only install (no server
    # extra) --version, `user` and `check` work and serving says what to install (main).
    from qm_server.server import BindError, QueueManagerServer

    try:
        server = QueueManagerServer(config)
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


def existing_database(args: argparse.Namespace) -> Path | None:
    """The database of --data-dir, or None (said on stderr) if there is none."""
    try:
        return sqlite_users.existing_database(args.user_data_dir or args.data_dir)
    except DataDirRefused as exc:
        print(f"qm-server: {exc}", file=sys.stderr)
        return None


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


def main(argv: list[str] | None = None) -> int:
    logs.quiet_grpc_core()  # before anything imports grpc
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logs.configure(args.log_level, args.log_format)
    except ModuleNotFoundError:
        print(f"qm-server: {logs.JSON_NEEDS}", file=sys.stderr)
        return 2
    if args.command == "user":
        return manage_users(args)
    if args.command == "check":
        return check_database(args)
    if args.command == "backup":
        return run_backup(args)
    try:
        config = config_from_args(args)
    except ValueError as exc:  # limits that contradict each other
        parser.error(str(exc))
    try:
        import qm_server.server  # noqa: F401  (what serve() imports)
    except ModuleNotFoundError as exc:  # a client-only install: grpc_reflection is absent
        print(f"qm-server: {exc}; {SERVER_EXTRA}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config, args.port_file))


if __name__ == "__main__":
    sys.exit(main())
