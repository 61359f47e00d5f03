"""Which store serves a configuration: the one place a second backend plugs in.

`--store` empty: the embedded SQLite store in --data-dir. `--store postgresql://...`:
the PostgreSQL store (pg_store.py), in the schema --store-schema. The PostgreSQL driver
is an optional extra, imported only when asked for: without it, StoreRefused says what
to install.
"""

from __future__ import annotations

from qm_server.config import ServerConfig
from qm_server.fsutil import DataDirRefused
from qm_server.sessions import SessionRegistry
from qm_server.store.base import Store, UserDirectory
from qm_server.store.sqlite import SqliteStore
from qm_server.store.sqlite_users import open_sqlite_user_directory

POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


class StoreRefused(DataDirRefused):
    """The configured store cannot be used (an unknown URL, a missing driver): one line
    for the operator, and the server (or `qm-server user`) exits with status 2, as for a
    data directory it refuses."""


def is_postgresql(config: ServerConfig) -> bool:
    if not config.store:
        return False
    if config.store.startswith(POSTGRESQL_SCHEMES):
        return True
    raise StoreRefused(
        f"--store {config.store!r}: give a postgresql:// URL, or leave it empty for the "
        "embedded store in --data-dir"
    )


def open_store(config: ServerConfig) -> Store:
    """The configured store, not yet opened."""
    if is_postgresql(config):
        return _pg_store(config)
    return SqliteStore(
        config.data_dir,
        config.durability,
        check_s=config.start_check_s,
        reserve_bytes=config.disk_reserve_bytes,
        idempotency_window_s=config.idempotency_window_s,
    )


def _pg_store(config: ServerConfig) -> Store:
    from qm_server.store import pg_driver

    if pg_driver.MISSING is not None:
        raise StoreRefused(f"{pg_driver.INSTALL_HINT} ({pg_driver.MISSING})")
    from qm_server.store.pg_store import PgStore

    return PgStore(
        config.store,
        config.store_schema,
        idempotency_window_s=config.idempotency_window_s,
        notify=not config.store_no_notify,
    )


def open_user_directory(config: ServerConfig) -> UserDirectory:
    """The users and grants of the configured store, for `qm-server user ...`: light
    enough to open beside a running server. Refuses (fsutil.DataDirRefused) a store that
    does not exist yet rather than creating one; other failures come at the first call,
    as errors.Unavailable."""
    if is_postgresql(config):
        return _pg_store_directory(config)
    return open_sqlite_user_directory(config)


def _pg_store_directory(config: ServerConfig) -> UserDirectory:
    """The PostgreSQL store itself serves as the directory: it is opened (the pool, the
    schema checked) at the first call, and runs no background work (timed=False)."""
    from qm_server.store import pg_driver

    if pg_driver.MISSING is not None:
        raise StoreRefused(f"{pg_driver.INSTALL_HINT} ({pg_driver.MISSING})")
    from qm_server.store.pg_users import PgUserDirectory

    return PgUserDirectory(config.store, config.store_schema)


def shared_sessions(config: ServerConfig, store: Store) -> SessionRegistry | None:
    """The sessions of a store that servers share, in its database (pg_sessions.py);
    None for a store of one server's own (the engine then keeps them in memory)."""
    if not is_postgresql(config):
        return None
    from qm_server.store.pg_sessions import PgSessions
    from qm_server.store.pg_store import PgStore

    assert isinstance(store, PgStore)
    return PgSessions(store, config.session_ttl_s)
