"""Changes to users and grants made as `qm-server user ...` makes them: through the user
directory it opens on a data directory (store/backends.py), beside a running server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qm_server.config import ServerConfig
from qm_server.store.backends import open_user_directory
from qm_server.store.base import UserDirectory


def as_user_command(data_dir: Path, change: Callable[[UserDirectory], Awaitable[object]]) -> None:
    """Run `change` on a directory of its own, on a thread and event loop of its own (as the
    command runs in a process of its own), so that a test may call it from inside a
    running server's loop, and even from code that the loop calls synchronously."""

    async def main() -> None:
        users = open_user_directory(ServerConfig(data_dir=data_dir))
        try:
            await change(users)
        finally:
            await users.close()

    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, main()).result()
