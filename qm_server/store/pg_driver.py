"""The PostgreSQL driver, an optional extra: imported here only, so that a server without
it runs the embedded store as before, and one asked for PostgreSQL without it fails at
start with one line that says what to install (backends.py)."""

from __future__ import annotations

try:
    import psycopg
    import psycopg.errors
    import psycopg.sql
    import psycopg_pool
except ImportError as exc:  # pragma: no cover - the tests install the extra
    MISSING: str | None = str(exc)
else:
    MISSING = None

INSTALL_HINT = (
    "the PostgreSQL store needs the driver: pip install 'queue-manager[postgresql]' "
    "(psycopg[binary,pool])"
)

__all__ = ["INSTALL_HINT", "MISSING", "psycopg", "psycopg_pool"]
