"""``qm sessions``: who is logged in (admins only), and ending one of their sessions."""

from __future__ import annotations

import argparse
from typing import Any

from .._sessions import SessionSummary
from ._args import Commands, Leaf, iso, ms, positive_int
from ._context import EXIT_OK, Context

__all__ = ["register"]


def cmd_sessions_list(ctx: Context, args: argparse.Namespace) -> int:
    sessions = list(ctx.connect().list_sessions(username=args.of or ""))
    ctx.emit(
        "\n".join(_session_line(s) for s in sessions) or None,
        {"sessions": [_session_json(s) for s in sessions]},
    )
    return EXIT_OK


def cmd_sessions_end(ctx: Context, args: argparse.Namespace) -> int:
    ctx.connect().end_session(args.id)
    ctx.emit(f"ended session {args.id}", {"session_id": args.id, "ended": True})
    return EXIT_OK


def _session_line(s: SessionSummary) -> str:
    return (
        f"{s.session_id}\t{s.username}\t{s.peer}\tsince {iso(s.created_at)}\t"
        f"active {iso(s.last_active_at)}\t{s.messages_held} held\t"
        f"{s.subscriptions} subscriptions"
    )


def _session_json(s: SessionSummary) -> dict[str, Any]:
    """The proto's field names, times as its Unix milliseconds."""
    return {
        "session_id": s.session_id,
        "username": s.username,
        "peer": s.peer,
        "created_at_ms": ms(s.created_at),
        "last_active_at_ms": ms(s.last_active_at),
        "messages_held": s.messages_held,
        "subscriptions": s.subscriptions,
    }


def register(commands: Commands, leaf: Leaf) -> None:
    """``sessions`` (a listing) and ``sessions end ID``."""
    sessions = leaf(
        commands,
        "sessions",
        cmd_sessions_list,
        "list live sessions: user, peer, start, last activity, messages held (admins)",
    )
    sessions.add_argument("--of", metavar="USER", help="only USER's sessions")
    actions = sessions.add_subparsers(dest="sessions_command", metavar="ACTION")
    end = leaf(
        actions,
        "end",
        cmd_sessions_end,
        "end a session as its logout would: its messages are ready again (admins)",
    )
    end.add_argument("id", type=positive_int, metavar="ID", help="the session's id (first column)")
