"""The PostgreSQL store's schema: created and migrated once, however many nodes start at once.

Each node opening the store runs `migrate` in one transaction that first takes a
transaction-scoped advisory lock named after the schema: nodes starting together queue on
it, the first creates the schema and applies every migration it lacks (pg_sql.MIGRATIONS)
and records the version in `meta`, and the others, let in after its commit, find the
version current and apply nothing. A failure rolls everything back, lock included.
A database whose version is newer than this code knows is refused rather than written.
"""

from __future__ import annotations

from psycopg import AsyncConnection, sql

from qm_server.fsutil import SchemaTooNew
from qm_server.store.pg_sql import MIGRATIONS


async def migrate(conn: AsyncConnection[tuple[object, ...]], schema: str) -> int:
    """Bring `schema` to the current version; the number of migrations applied."""
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('qm-migrate:' || %s::text))", (schema,)
        )
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        await conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL)"
        )
        cursor = await conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        row = await cursor.fetchone()
        version = int(str(row[0])) if row else 0
        if version > len(MIGRATIONS):
            raise SchemaTooNew(too_new(schema, version))
        for script in MIGRATIONS[version:]:
            await conn.execute(script)
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(len(MIGRATIONS)),),
        )
        return len(MIGRATIONS) - version


async def current_version(conn: AsyncConnection[tuple[object, ...]], schema: str) -> int:
    """The schema's version; 0 when it holds no store."""
    cursor = await conn.execute(
        "SELECT to_regclass(format('%%I.meta', %s::text)) IS NOT NULL", (schema,)
    )
    row = await cursor.fetchone()
    if row is None or not row[0]:
        return 0
    cursor = await conn.execute(
        sql.SQL("SELECT value FROM {}.meta WHERE key = 'schema_version'").format(
            sql.Identifier(schema)
        )
    )
    row = await cursor.fetchone()
    return int(str(row[0])) if row else 0


def too_new(schema: str, version: int) -> str:
    """Why a schema migrated by a newer qm-server is refused, and what to do."""
    return (
        f"schema {schema!r} is at version {version}, newer than this qm-server "
        f"knows ({len(MIGRATIONS)}): run a newer qm-server"
    )
