"""Every SQL statement of the SQLite store, named and commented, in one place."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

# Connection settings --------------------------------------------------------------------
# Every connection that writes: WAL (readers see the last commit and never block the
# writer), fsync at every commit (the contract's durability; the store may lower it, see
# sqlite_file.SYNCHRONOUS), and a wait instead of SQLITE_BUSY while another holds the lock.
CONNECT_PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA busy_timeout = 10000",
)
# Checkpoint after this many WAL pages. A small WAL that is reset often keeps commits
# overwriting the same file blocks instead of growing the file: measured here, the mean
# FULL commit fell from 0.45-0.75 ms (SQLite's default of 1000 pages) to about 0.2 ms.
# A checkpoint running on another thread cannot reset the WAL under continuous writes
# (it never catches up), so the writer checkpoints itself.
WAL_AUTOCHECKPOINT_PAGES = 200


def writer_pragmas(synchronous: str) -> tuple[str, ...]:
    """The store's writer connection, after CONNECT_PRAGMAS: `synchronous` is FULL or
    NORMAL (sqlite_file.SYNCHRONOUS)."""
    return (
        f"PRAGMA synchronous = {synchronous}",
        f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}",
        "PRAGMA journal_size_limit = 67108864",
        "PRAGMA cache_size = -65536",  # 64 MiB of pages, at most
    )


# The reader connections (sqlite_readers.py): they never write.
READER_PRAGMAS = (
    "PRAGMA query_only = 1",
    "PRAGMA busy_timeout = 10000",
    "PRAGMA cache_size = -16384",  # 16 MiB of pages, at most
)
# The integrity checks (sqlite_file.check_integrity): quick_check within a deadline at
# start, the full integrity_check by `qm-server check`.
QUICK_CHECK = "PRAGMA quick_check"
INTEGRITY_CHECK = "PRAGMA integrity_check"

# Transactions: the writer's take the write lock at once (IMMEDIATE), so a transaction
# never fails half-way for want of it; a reader's is a snapshot, ended by ROLLBACK.
BEGIN = "BEGIN IMMEDIATE"
BEGIN_READ = "BEGIN"
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"

# Migration 6 (after 5, the message lifecycle's columns): each queue's lifecycle
# settings, and the keys of idempotent adds.
# - queues.settings: the queue's QueueSettings as one JSON object (settings_json.py),
#   NULL for the defaults (the seed's behaviour), which every queue made before has.
#   One column rather than one per setting: the store reads settings only into memory
#   (load_index) and writes them whole (create, update), never filters or joins on one in
#   SQL, so a column each would buy nothing but a migration for every new setting.
# - idempotency_keys: an Add or AddAll with a request_id (base.IdempotencyKey), written in
#   the transaction of the add itself, so that a retry after a restart still matches. Its
#   ids are first_id .. first_id + count - 1 (an add's ids are consecutive). Rows older
#   than the window match nothing and are pruned a few at a time (created_at_ms index).
MIGRATION_QUEUE_SETTINGS = """
    ALTER TABLE queues ADD COLUMN settings TEXT;
    CREATE TABLE idempotency_keys (
        username      TEXT NOT NULL,
        request_id    TEXT NOT NULL,
        fingerprint   BLOB NOT NULL,
        first_id      INTEGER NOT NULL,
        count         INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (username, request_id)
    ) WITHOUT ROWID;
    CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at_ms);
"""

# Schema migrations, applied in order; meta.schema_version records how many ran.
# Never edit a published entry: append a new one. They are history: the tables they
# describe may have changed since (migration 3 dropped `messages`); SCHEMA below is what a
# migrated file holds today.
MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
    # 1: queues, messages, maps, users.
    """
    CREATE TABLE IF NOT EXISTS meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE queues (
        id   INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE
    );
    -- Ids come from the writer's counter. At start it continues after the largest id
    -- present or meta.next_message_id, which is saved whenever the newest message is
    -- deleted, so an id is never reused, even after a restart.
    -- state: 0 ready, 1 in flight for session_id. Acked messages are deleted.
    CREATE TABLE messages (
        id             INTEGER PRIMARY KEY,
        queue_id       INTEGER NOT NULL,
        state          INTEGER NOT NULL DEFAULT 0,
        session_id     INTEGER,
        delivery_count INTEGER NOT NULL DEFAULT 0,
        payload        TEXT NOT NULL
    );
    -- Claims read the oldest ready ids of one queue: a partial index holds only those.
    CREATE INDEX messages_ready ON messages (queue_id, id) WHERE state = 0;
    -- Releasing a session finds its in-flight messages without a scan.
    CREATE INDEX messages_in_flight ON messages (session_id) WHERE state = 1;
    CREATE TABLE maps (
        id   INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE
    );
    -- BINARY collation compares UTF-8 bytes: the key order MapGetList promises.
    CREATE TABLE map_entries (
        map_id INTEGER NOT NULL,
        key    TEXT NOT NULL,
        value  TEXT NOT NULL,
        PRIMARY KEY (map_id, key)
    ) WITHOUT ROWID;
    CREATE TABLE users (
        name          TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        is_admin      INTEGER NOT NULL DEFAULT 0
    );
    """,
    # 2: grants of actions on name patterns (permissions.py).
    """
    CREATE TABLE grants (
        username TEXT NOT NULL,
        action   TEXT NOT NULL,
        kind     TEXT NOT NULL,
        pattern  TEXT NOT NULL,
        PRIMARY KEY (username, action, kind, pattern)
    ) WITHOUT ROWID;
    """,
    # 3: see migrate_3 below.
    lambda conn: migrate_3(conn),
    # 4: who created each queue and map, for the per-user quotas (quotas.py). Rows made
    # before have no owner (NULL): their creator is unknown, so they count against no
    # user's quota, only against the server-wide limits.
    """
    ALTER TABLE queues ADD COLUMN owner TEXT;
    ALTER TABLE maps ADD COLUMN owner TEXT;
    """,
    # 5: see migrate_5 below.
    lambda conn: migrate_5(conn),
    # 6: queue settings and idempotency keys (MIGRATION_QUEUE_SETTINGS above).
    MIGRATION_QUEUE_SETTINGS,
]

# The schema as the migrations leave it today, to read in one place; a test
# (tests/test_store_migration.py) checks that a file migrated from empty has exactly these
# tables, columns and indexes. Change it together with a new migration.
SCHEMA = """
-- Small settings of the file: schema_version (how many MIGRATIONS ran),
-- next_message_id (saved whenever the newest message is deleted, so that an id is never
-- handed out twice, even after a restart), probe (bumped by the health probe's write).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per queue. Its ready and in-flight messages live in a table of their own,
-- messages_<id> (MessageStatements.create: id INTEGER PRIMARY KEY, delivery_count,
-- payload, enqueued_at), created with the queue and dropped with it. Every message id
-- at or below delivered_upto was delivered at least once (but those MessageStatements
-- names); being in flight is kept in memory only (inflight.py).
-- owner: who created it, for the per-user quotas; NULL for queues made before owners
-- were kept. settings: its lifecycle settings as a JSON object (settings_json.py), NULL
-- for the defaults.
CREATE TABLE queues (
    id             INTEGER PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    delivered_upto INTEGER NOT NULL DEFAULT 0,
    owner          TEXT,
    settings       TEXT
);
CREATE TABLE maps (
    id    INTEGER PRIMARY KEY,
    name  TEXT NOT NULL UNIQUE,
    owner TEXT
);
-- BINARY collation compares UTF-8 bytes: the key order MapGetList promises.
CREATE TABLE map_entries (
    map_id INTEGER NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (map_id, key)
) WITHOUT ROWID;
CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    is_admin      INTEGER NOT NULL DEFAULT 0
);
-- Grants of actions on name patterns (permissions.py).
CREATE TABLE grants (
    username TEXT NOT NULL,
    action   TEXT NOT NULL,
    kind     TEXT NOT NULL,
    pattern  TEXT NOT NULL,
    PRIMARY KEY (username, action, kind, pattern)
) WITHOUT ROWID;
-- Messages not ready yet: added with a delay, or waiting out their retry backoff. Kept
-- out of the queues' messages tables so that claims, which walk those, never step over
-- them (sqlite_due.py says why). delivery_count: the deliveries so far; enqueued_at and
-- ready_at: Unix time, ms.
CREATE TABLE delayed (
    id             INTEGER PRIMARY KEY,
    queue_id       INTEGER NOT NULL,
    ready_at       INTEGER NOT NULL,
    delivery_count INTEGER NOT NULL,
    enqueued_at    INTEGER NOT NULL,
    payload        TEXT NOT NULL
);
CREATE INDEX delayed_due ON delayed (ready_at);
CREATE INDEX delayed_queue ON delayed (queue_id);
-- The history of each dead letter (the message itself is a row of the queue holding it,
-- `holder`): the queue it was dead-lettered from, its deliveries then, when and why.
CREATE TABLE dead_letters (
    id               INTEGER PRIMARY KEY,
    holder           INTEGER NOT NULL,
    original_queue   TEXT NOT NULL,
    delivery_count   INTEGER NOT NULL,
    dead_lettered_at INTEGER NOT NULL,
    cause            TEXT NOT NULL
);
CREATE INDEX dead_letters_holder ON dead_letters (holder, id);
-- Idempotent adds (base.IdempotencyKey): the first answer to (username, request_id),
-- ids first_id .. first_id + count - 1, kept for the idempotency window from
-- created_at_ms (Unix time, ms), then pruned a few rows at a time.
CREATE TABLE idempotency_keys (
    username      TEXT NOT NULL,
    request_id    TEXT NOT NULL,
    fingerprint   BLOB NOT NULL,
    first_id      INTEGER NOT NULL,
    count         INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (username, request_id)
) WITHOUT ROWID;
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at_ms);
"""

HAS_META = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
SCHEMA_VERSION = "SELECT value FROM meta WHERE key = 'schema_version'"
SET_SCHEMA_VERSION = (
    "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
# Bumped by the health probe: a real write that proves the file still takes commits.
TOUCH_PROBE = (
    "INSERT INTO meta (key, value) VALUES ('probe', '1') "
    "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
)

# Loading the in-memory index ------------------------------------------------------------
ALL_QUEUES = "SELECT id, name, delivered_upto, owner, settings FROM queues"
ALL_MAPS = "SELECT id, name, owner FROM maps"
MAP_ID = "SELECT id FROM maps WHERE name = ?"
# The id counter saved when the newest message was deleted (see SqliteStore): the next id
# is after it and after the largest id present.
SAVED_NEXT_MESSAGE_ID = "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'next_message_id'"
SAVE_NEXT_MESSAGE_ID = (
    "INSERT INTO meta (key, value) VALUES ('next_message_id', ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)

# Queues ---------------------------------------------------------------------------------
DELETE_QUEUE_DELAYED = "DELETE FROM delayed WHERE queue_id = ?"
DELETE_HELD_DEAD_LETTERS = "DELETE FROM dead_letters WHERE holder = ?"
INSERT_QUEUE = "INSERT INTO queues (name, owner, settings) VALUES (?, ?, ?)"
SET_QUEUE_SETTINGS = "UPDATE queues SET settings = ? WHERE id = ?"
DELETE_QUEUE = "DELETE FROM queues WHERE id = ?"
# First deliveries: one row per queue and transaction, however many messages it took.
SET_DELIVERED_UPTO = "UPDATE queues SET delivered_upto = ? WHERE id = ?"


# Delayed messages and dead letters (sqlite_due.py) ---------------------------------------
INSERT_DELAYED = (
    "INSERT INTO delayed (id, queue_id, ready_at, delivery_count, enqueued_at, payload)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
# A delayed add of a run of ids: (first id, queue id, ready_at, enqueued_at, payloads).
INSERT_DELAYED_MANY = (
    "INSERT INTO delayed (id, queue_id, ready_at, delivery_count, enqueued_at, payload)"
    " SELECT ?1 + key, ?2, ?3, 0, ?4, value FROM json_each(?5)"
)
DUE_DELAYED = (
    "SELECT id, queue_id, delivery_count, enqueued_at, payload FROM delayed"
    " WHERE ready_at <= ? ORDER BY ready_at, id LIMIT ?"
)
READ_DELAYED_OF = (
    "SELECT id, delivery_count, payload, enqueued_at FROM delayed"
    " WHERE queue_id = ? AND id IN (SELECT value FROM json_each(?))"
)
DELETE_DELAYED_IDS = "DELETE FROM delayed WHERE id IN (SELECT value FROM json_each(?))"
NEXT_DELAYED = "SELECT min(ready_at) FROM delayed"
DELAYED_COUNTS = "SELECT queue_id, count(*) FROM delayed GROUP BY queue_id"
MAX_DELAYED_ID = "SELECT max(id) FROM delayed"
HELD_DEAD_LETTER_COUNTS = "SELECT holder, count(*) FROM dead_letters GROUP BY holder"
SAVE_DEAD_LETTER = (
    "INSERT OR REPLACE INTO dead_letters"
    " (id, holder, original_queue, delivery_count, dead_lettered_at, cause)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
DEAD_LETTERED_FROM = "SELECT count(*) FROM dead_letters WHERE original_queue = ?"
HELD_DEAD_LETTERS = "SELECT id, original_queue FROM dead_letters WHERE holder = ? ORDER BY id"
HELD_DEAD_LETTERS_OF = (
    "SELECT id, original_queue FROM dead_letters"
    " WHERE holder = ? AND id IN (SELECT value FROM json_each(?))"
)
DELETE_DEAD_LETTER_IDS = "DELETE FROM dead_letters WHERE id IN (SELECT value FROM json_each(?))"
DELETE_DEAD_LETTER_RANGE = "DELETE FROM dead_letters WHERE id BETWEEN ? AND ?"
PURGE_DEAD_LETTERS = (
    "DELETE FROM dead_letters WHERE holder = ? AND id NOT IN (SELECT value FROM json_each(?))"
)


# Messages -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MessageStatements:
    """The statements on one queue's messages, which live in a table of their own.

    Why a table per queue: the primary key (the message id) is then the only index, so
    an add, a claim and an ack each touch one b-tree instead of two, and destroying a
    queue is a DROP TABLE. Measured here, that cut the CPU of an add of 100 messages by
    about a fifth and of a claim plus an ack by about a quarter. Ids stay global (one
    counter for all queues), so they still say which message came first.

    The stored delivery_count of a row above the queue's mark is its deliveries so far
    (0 for an add). At or below the mark the mark itself records one delivery, so a
    stored 0 means 1; a row moved in below the mark before any delivery (a delayed add
    come due, a dead letter of max_age, a redrive) stores -1 for none (`stored_count`).
    enqueued_at is the message's first add (Unix time, ms), kept through every move.
    """

    table: str
    create: str
    drop: str
    count: str
    max_id: str
    # Delivered before and not acked: in flight when the last process stopped, or given back.
    delivered_ids: str
    insert_one: str
    # A whole batch in one statement (a JSON array of payloads): one call into SQLite
    # instead of one per row. JSON cannot carry NUL through SQLite's json_each, so
    # batches holding a NUL character use insert_one per row.
    insert_many: str
    # A claim reads the oldest messages never delivered (above the queue's mark) ...
    # Each message is (id, payload, its delivery count once this delivery is recorded).
    # They come back as three JSON arrays (ids, payloads, counts) in one row: the sqlite3
    # module lets go of the GIL for every row it steps through, and under load getting it
    # back costs more than the JSON; flat arrays decode a quarter faster than an array of
    # triples. (The JSON functions keep NUL characters, escaped.) Aggregates promise no
    # order, so the reader sorts the messages by id. Rows above the mark were never
    # delivered, so their stored count is 0 and their first delivery makes it 1.
    read_undelivered: str
    # ... after those given back (a JSON array of ids), which are older. A stored count
    # of 0 at or below the mark means one delivery, recorded by the mark alone.
    read_by_ids: str
    # Redeliveries: the message's own count.
    set_delivery_count: str
    # Acks delete runs of consecutive ids (a FIFO consumer acks mostly whole runs): a
    # range walks the table once, where a list of ids seeks every row.
    delete_range: str
    # Moving rows between queues and the delayed table (ids as a JSON array).
    read_rows: str
    insert_row: str
    delete_ids: str
    # A purge keeps only the rows in flight (a JSON array of ids).
    purge: str
    # Oldest first: max_age walks from here and stops at the first younger message.
    by_age: str
    # GetQueueInfo's oldest ready message: given back (by id), or the first above the mark.
    enqueued_at: str
    first_undelivered: str
    # The dead letters this queue holds, with their history: (holder, after id, limit).
    # One backing off in this queue is a row of `delayed` meanwhile.
    dead_letters: str

    @classmethod
    def of(cls, queue_id: int) -> MessageStatements:
        table = f"messages_{int(queue_id)}"
        return cls(
            table=table,
            create=f"""CREATE TABLE {table} (
                id             INTEGER PRIMARY KEY,
                delivery_count INTEGER NOT NULL DEFAULT 0,
                payload        TEXT NOT NULL,
                enqueued_at    INTEGER NOT NULL DEFAULT 0
            )""",
            drop=f"DROP TABLE {table}",
            count=f"SELECT count(*) FROM {table}",
            max_id=f"SELECT max(id) FROM {table}",
            delivered_ids=f"SELECT id FROM {table} WHERE id <= ? ORDER BY id",
            insert_one=f"INSERT INTO {table} (id, payload, enqueued_at) VALUES (?, ?, ?)",
            insert_many=(
                f"INSERT INTO {table} (id, payload, enqueued_at)"
                " SELECT ?1 + key, value, ?2 FROM json_each(?3)"
            ),
            read_undelivered=f"""
                SELECT json_group_array(id), json_group_array(payload),
                       json_group_array(delivery_count + 1), json_group_array(enqueued_at)
                  FROM (SELECT id, payload, delivery_count, enqueued_at FROM {table}
                         WHERE id > ? ORDER BY id LIMIT ?)""",
            read_by_ids=f"""
                SELECT json_group_array(id), json_group_array(payload),
                       json_group_array(CASE WHEN delivery_count < 0 THEN 1
                                        ELSE max(delivery_count, 1) + 1 END),
                       json_group_array(enqueued_at)
                  FROM {table} WHERE id IN (SELECT value FROM json_each(?))""",
            set_delivery_count=f"UPDATE {table} SET delivery_count = ? WHERE id = ?",
            delete_range=f"DELETE FROM {table} WHERE id BETWEEN ? AND ?",
            read_rows=(
                f"SELECT id, delivery_count, payload, enqueued_at FROM {table}"
                " WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id"
            ),
            insert_row=(
                f"INSERT INTO {table} (id, delivery_count, payload, enqueued_at)"
                " VALUES (?, ?, ?, ?)"
            ),
            delete_ids=f"DELETE FROM {table} WHERE id IN (SELECT value FROM json_each(?))",
            purge=f"DELETE FROM {table} WHERE id NOT IN (SELECT value FROM json_each(?))",
            by_age=f"SELECT id, enqueued_at FROM {table} ORDER BY id",
            enqueued_at=f"SELECT enqueued_at FROM {table} WHERE id = ?",
            first_undelivered=(f"SELECT enqueued_at FROM {table} WHERE id > ? ORDER BY id LIMIT 1"),
            dead_letters=f"""
                SELECT d.id, d.original_queue, d.delivery_count,
                       coalesce(m.enqueued_at, x.enqueued_at), d.dead_lettered_at, d.cause,
                       coalesce(m.payload, x.payload)
                  FROM dead_letters d
                  LEFT JOIN {table} m ON m.id = d.id
                  LEFT JOIN delayed x ON x.id = d.id
                 WHERE d.holder = ? AND d.id > ? ORDER BY d.id LIMIT ?""",
        )


def migrate_3(conn: sqlite3.Connection) -> None:
    """Schema 3: one messages table per queue; being in flight moves to memory.

    A message's first delivery is recorded by its queue's delivered_upto mark instead of
    its own row. Every id at or below the mark has been delivered at least once; claims
    take ids in order, so the mark of an existing file is its largest id ever delivered.
    """
    conn.execute("ALTER TABLE queues ADD COLUMN delivered_upto INTEGER NOT NULL DEFAULT 0")
    conn.execute(
        "UPDATE queues SET delivered_upto = coalesce((SELECT max(id) FROM messages"
        " WHERE messages.queue_id = queues.id AND messages.delivery_count > 0), 0)"
    )
    (next_id,) = conn.execute(
        "SELECT max(coalesce((SELECT CAST(value AS INTEGER) FROM meta"
        " WHERE key = 'next_message_id'), 1), coalesce((SELECT max(id) FROM messages), 0) + 1)"
    ).fetchone()
    conn.execute(SAVE_NEXT_MESSAGE_ID, (str(next_id),))
    for (queue_id,) in conn.execute("SELECT id FROM queues").fetchall():
        statements = MessageStatements.of(queue_id)
        conn.execute(statements.create)
        conn.execute(
            f"INSERT INTO {statements.table} (id, delivery_count, payload)"
            " SELECT id, delivery_count, payload FROM messages WHERE queue_id = ?",
            (queue_id,),
        )
    conn.execute("DROP TABLE messages")


def stored_count(delivery_count: int, message_id: int, mark: int) -> int:
    """The delivery_count to store for a message moved into a queue whose mark is `mark`
    (MessageStatements says why 0 at or below the mark would mean 1)."""
    if delivery_count == 0 and message_id <= mark:
        return -1
    return delivery_count


def true_count(stored: int, message_id: int, mark: int) -> int:
    """The deliveries so far of a row, from its stored count and its queue's mark."""
    if message_id > mark:
        return stored
    return 0 if stored < 0 else max(stored, 1)


def migrate_5(conn: sqlite3.Connection) -> None:
    """Schema 5: each message's first add time; delayed messages; dead-letter history.

    Messages already present get the migration's time as their first add: the time they
    were really added was not kept.
    """
    now_ms = int(time.time() * 1000)
    for (queue_id,) in conn.execute("SELECT id FROM queues").fetchall():
        table = MessageStatements.of(queue_id).table
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        # migrate_3 creates the tables with today's MessageStatements.create, which has
        # the column already (at 0) when it ran in the same upgrade.
        if "enqueued_at" not in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN enqueued_at INTEGER NOT NULL DEFAULT 0")
        conn.execute(f"UPDATE {table} SET enqueued_at = ?", (now_ms,))
    conn.execute(
        """CREATE TABLE delayed (
            id             INTEGER PRIMARY KEY,
            queue_id       INTEGER NOT NULL,
            ready_at       INTEGER NOT NULL,
            delivery_count INTEGER NOT NULL,
            enqueued_at    INTEGER NOT NULL,
            payload        TEXT NOT NULL
        )"""
    )
    conn.execute("CREATE INDEX delayed_due ON delayed (ready_at)")
    conn.execute("CREATE INDEX delayed_queue ON delayed (queue_id)")
    conn.execute(
        """CREATE TABLE dead_letters (
            id               INTEGER PRIMARY KEY,
            holder           INTEGER NOT NULL,
            original_queue   TEXT NOT NULL,
            delivery_count   INTEGER NOT NULL,
            dead_lettered_at INTEGER NOT NULL,
            cause            TEXT NOT NULL
        )"""
    )
    conn.execute("CREATE INDEX dead_letters_holder ON dead_letters (holder, id)")


# Maps -----------------------------------------------------------------------------------
INSERT_MAP = "INSERT INTO maps (name, owner) VALUES (?, ?)"
DELETE_MAP = "DELETE FROM maps WHERE id = ?"
DELETE_MAP_ENTRIES = "DELETE FROM map_entries WHERE map_id = ?"
PUT_ENTRY = (
    "INSERT INTO map_entries (map_id, key, value) VALUES (?, ?, ?)"
    " ON CONFLICT (map_id, key) DO UPDATE SET value = excluded.value"
)
DELETE_ENTRY = "DELETE FROM map_entries WHERE map_id = ? AND key = ?"
GET_ENTRY = "SELECT value FROM map_entries WHERE map_id = ? AND key = ?"
ALL_ENTRIES = "SELECT key, value FROM map_entries WHERE map_id = ? ORDER BY key"
PAGE_ENTRIES = "SELECT key, value FROM map_entries WHERE map_id = ? ORDER BY key LIMIT ? OFFSET ?"
# Key-cursor paging: a seek on the primary key, so a page costs the same wherever it
# starts, and entries added or removed before the cursor shift nothing after it. The
# first page (start_after '') takes the empty key too.
PAGE_ENTRIES_AFTER = (
    "SELECT key, value FROM map_entries WHERE map_id = ? AND (key > ? OR ? IS NULL)"
    " ORDER BY key LIMIT ?"
)
# ListMaps: names after a cursor, in UTF-8 byte order (BINARY collation).
MAP_NAMES_AFTER = "SELECT name FROM maps WHERE name > ? ORDER BY name LIMIT ?"

# Idempotent adds ------------------------------------------------------------------------
IDEMPOTENCY_KEY = (
    "SELECT fingerprint, first_id, count, created_at_ms FROM idempotency_keys"
    " WHERE username = ? AND request_id = ?"
)
# An expired row of the same key is replaced: it matches nothing any more.
PUT_IDEMPOTENCY_KEY = (
    "INSERT INTO idempotency_keys"
    " (username, request_id, fingerprint, first_id, count, created_at_ms)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (username, request_id) DO UPDATE SET"
    " fingerprint = excluded.fingerprint, first_id = excluded.first_id,"
    " count = excluded.count, created_at_ms = excluded.created_at_ms"
)
# At most `?` of the oldest rows created at or before a time: each idempotent add prunes a few,
# more than it adds, so expired keys cannot pile up and no commit deletes many.
PRUNE_IDEMPOTENCY_KEYS = (
    "DELETE FROM idempotency_keys WHERE (username, request_id) IN"
    " (SELECT username, request_id FROM idempotency_keys WHERE created_at_ms <= ?"
    " ORDER BY created_at_ms LIMIT ?)"
)

# Users ----------------------------------------------------------------------------------
GET_USER = "SELECT name, password_hash, is_admin FROM users WHERE name = ?"
COUNT_USERS = "SELECT count(*) FROM users"
# A taken name inserts nothing (rowcount 0): the check and the insert are one statement.
CREATE_USER = (
    "INSERT INTO users (name, password_hash, is_admin) VALUES (?, ?, ?)"
    " ON CONFLICT (name) DO NOTHING"
)
# `user passwd --admin` makes an admin; without it, an admin stays one.
SET_PASSWORD = "UPDATE users SET password_hash = ?, is_admin = max(is_admin, ?) WHERE name = ?"
USER_EXISTS = "SELECT 1 FROM users WHERE name = ?"
DELETE_USER = "DELETE FROM users WHERE name = ?"
DELETE_USER_GRANTS = "DELETE FROM grants WHERE username = ?"
ADD_GRANT = "INSERT OR IGNORE INTO grants (username, action, kind, pattern) VALUES (?, ?, ?, ?)"
REMOVE_GRANT = "DELETE FROM grants WHERE username = ? AND action = ? AND kind = ? AND pattern = ?"
ALL_GRANTS = "SELECT username, action, kind, pattern FROM grants ORDER BY 1, 2, 3, 4"
LIST_USERS = "SELECT name, password_hash, is_admin FROM users ORDER BY name"
