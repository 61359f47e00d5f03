"""`qm-server user add|passwd|remove|list|grant|revoke`: users and grants of a data directory.

They speak only the UserDirectory interface (store/base.py), so they work on whichever
store the configuration names (store/backends.py), and beside a running server: each
change is one transaction of its own, which the server sees at the next login or grant
reload. Exit statuses: 0 done, 1 refused (no such user, a name taken, a bad action),
2 the store could not be used (nothing changed). Each change done is also an audit event
on stderr (audit.py: user.added, user.removed, user.password_changed, grant.added,
grant.revoked), in qm-server's --log-format.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from pathlib import Path

from qm_server import audit, errors
from qm_server.audit import Event
from qm_server.auth import PasswordHasher
from qm_server.config import AuthSettings, ServerConfig
from qm_server.fsutil import DataDirRefused
from qm_server.permissions import KINDS, Grant
from qm_server.store.backends import open_user_directory
from qm_server.store.base import UserDirectory, UserRecord


def add_user_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`qm-server user ...`, each with its own --data-dir (dest user_data_dir)."""
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


def manage_users(args: argparse.Namespace) -> int:
    """One user command on the directory of --data-dir (given after `user ACTION` or
    before `user`), which must hold a store already."""
    config = ServerConfig(
        data_dir=args.user_data_dir or args.data_dir,
        store=getattr(args, "store", ""),  # given before `user`, as --store-schema
        store_schema=getattr(args, "store_schema", "qm"),
    )
    try:
        directory = open_user_directory(config)
    except DataDirRefused as exc:
        print(f"qm-server: {exc}", file=sys.stderr)
        return 2
    # Asked for before any transaction, so that no lock waits on a person typing.
    password = read_password(args) if args.action in ("add", "passwd") else ""
    return asyncio.run(run_closing(directory, args, password))


async def run_closing(directory: UserDirectory, args: argparse.Namespace, password: str) -> int:
    try:
        return await change_users(directory, args, password)
    except (errors.Unavailable, DataDirRefused) as exc:  # PostgreSQL: checked at first use
        print(f"qm-server: {exc}", file=sys.stderr)
        return 2
    finally:
        await directory.close()


async def change_users(directory: UserDirectory, args: argparse.Namespace, password: str) -> int:
    """One user command; each change one atomic call of the directory."""
    if args.action == "list":
        for name, permissions in (await directory.load_permissions()).items():
            grants = "; ".join(str(g) for g in permissions.grants)
            role = " (admin)" if permissions.is_admin else ""
            print(f"{name}{role}{': ' + grants if grants else ''}")
        return 0
    if args.action in ("grant", "revoke"):
        return await change_grants(directory, args)
    if args.action == "remove":
        if not await directory.delete_user(args.name):
            return no_user(args.name)
        print(f"removed user {args.name}")
        audit.record(Event.USER_REMOVED, user=args.name)
        return 0
    # Refused before the slow hash when it is known already; the call refuses it again
    # should another command have changed it meanwhile.
    existing = await directory.get_user(args.name)
    if args.action == "add" and existing is not None:
        return name_taken(args.name)
    if args.action == "passwd" and existing is None:
        return no_user(args.name)
    hashed = PasswordHasher.from_settings(AuthSettings()).hash(password)
    if args.action == "add":
        if not await directory.create_user(UserRecord(args.name, hashed, args.admin)):
            return name_taken(args.name)
        print(f"added user {args.name}")
        audit.record(Event.USER_ADDED, user=args.name, admin=args.admin)
    else:
        if not await directory.set_password(args.name, hashed, make_admin=args.admin):
            return no_user(args.name)
        print(f"changed password of user {args.name}")
        audit.record(Event.USER_PASSWORD_CHANGED, user=args.name, admin=args.admin)
    return 0


async def change_grants(directory: UserDirectory, args: argparse.Namespace) -> int:
    """Every grant of the command, or (refused) none."""
    if await directory.get_user(args.name) is None:
        return no_user(args.name)
    try:
        grants = [Grant(a.strip(), args.kind, args.pattern) for a in args.actions.split(",")]
    except ValueError as exc:
        print(f"qm-server: {exc}", file=sys.stderr)
        return 1
    if args.action == "grant":
        if await directory.add_grants(args.name, grants) is None:
            return no_user(args.name)
        for grant in grants:
            print(f"granted {grant} to {args.name}")
            audit.record(Event.GRANT_ADDED, user=args.name, **_fields(grant))
        return 0
    held = await directory.remove_grants(args.name, grants)
    if held is None:
        return no_user(args.name)
    for grant, was_held in zip(grants, held, strict=True):
        if was_held:
            print(f"revoked {grant} from {args.name}")
            audit.record(Event.GRANT_REVOKED, user=args.name, **_fields(grant))
        else:
            print(f"{args.name} did not hold {grant}")
    return 0


def _fields(grant: Grant) -> dict[str, str]:
    return {"action": grant.action, "kind": grant.kind, "pattern": grant.pattern}


def no_user(name: str) -> int:
    print(f"qm-server: no user {name!r}", file=sys.stderr)
    return 1


def name_taken(name: str) -> int:
    print(f"qm-server: user {name!r} already exists", file=sys.stderr)
    return 1
