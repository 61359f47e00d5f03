"""Which store serves a configuration: the one place a second backend plugs in."""

from __future__ import annotations

from qm_server.config import ServerConfig
from qm_server.store.base import UserDirectory
from qm_server.store.sqlite_users import open_sqlite_user_directory


def open_user_directory(config: ServerConfig) -> UserDirectory:
    """The users and grants of the configured store, for `qm-server user ...`: light
    enough to open beside a running server. Refuses (fsutil.DataDirRefused) a store that
    does not exist yet rather than creating one; other failures come at the first call,
    as errors.Unavailable."""
    return open_sqlite_user_directory(config)
