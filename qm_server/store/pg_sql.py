"""Every statement of the PostgreSQL store, and its schema's migrations (pg_migrate.py
applies them).

Tables live in the store's schema (the connection's search_path), so statements name
them unqualified. Times are Unix epoch milliseconds (bigint), like the interface's, and
"now" is one SQL expression (NOW): the database's clock, `now()`, which is the start of
the transaction, so that every node agrees on when a lease ends. A test passes its fake
clock's time as the `now` parameter instead (PgStore's `clock`).

A message is one row of `messages` through its whole life; `state` says where it is:
READY (claimable), HELD (in flight: owner node and session, lease deadline) or WAITING
(a delayed add or a retry backoff: ready_at). Each state has a partial index of its own,
so that claims walk only ready rows of their queue, in id order, and never step over
waiting ones (the SQLite store keeps them in a table of their own for the same reason,
sqlite_due.py): a partial index cannot say `ready_at <= now()` (its predicate must be
immutable), so waiting is a state, and run_due flips due rows to READY.

Payloads, map keys and map values are bytea (their UTF-8 bytes): PostgreSQL's text
cannot hold NUL, which a proto string may, and bytea orders by bytes, which is the
UTF-8 byte order the interface promises for keys.
"""

from __future__ import annotations

from typing import Final

READY: Final = 0
HELD: Final = 1
WAITING: Final = 2

# The database's clock in Unix ms, or the caller's (a test's fake clock).
NOW = "coalesce(%(now)s::bigint, floor(extract(epoch FROM now()) * 1000)::bigint)"

# Migrations: each is applied once, in order, in the transaction that records it.
MIGRATIONS: tuple[str, ...] = (
    # 1: the whole schema.
    """
    CREATE TABLE queues (
        id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name     text COLLATE "C" NOT NULL UNIQUE,
        owner    text,
        settings text
    );
    CREATE SEQUENCE message_ids;
    CREATE TABLE messages (
        id              bigint PRIMARY KEY,
        queue_id        bigint NOT NULL,
        state           smallint NOT NULL,
        payload         bytea NOT NULL,
        enqueued_at     bigint NOT NULL,
        ready_at        bigint NOT NULL DEFAULT 0,
        delivery_count  integer NOT NULL DEFAULT 0,
        owner_node      bigint,
        owner_session   bigint,
        lease_deadline  bigint NOT NULL DEFAULT 0,
        expired_node    bigint,
        expired_session bigint
    ) WITH (
        fillfactor = 90,
        autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_insert_scale_factor = 0.01,
        autovacuum_analyze_scale_factor = 0.01,
        autovacuum_vacuum_cost_delay = 0
    );
    CREATE INDEX messages_ready ON messages (queue_id, id) WHERE state = 0;
    CREATE INDEX messages_held ON messages (owner_node, owner_session) WHERE state = 1;
    CREATE INDEX messages_leases ON messages (lease_deadline)
        WHERE state = 1 AND lease_deadline > 0;
    CREATE INDEX messages_waiting ON messages (ready_at) WHERE state = 2;
    CREATE INDEX messages_not_ready ON messages (queue_id, state) WHERE state <> 0;
    CREATE INDEX messages_expired ON messages (expired_node, expired_session)
        WHERE expired_session IS NOT NULL;
    CREATE TABLE dead_letters (
        id               bigint PRIMARY KEY,
        holder           bigint NOT NULL,
        original_queue   text COLLATE "C" NOT NULL,
        delivery_count   integer NOT NULL,
        dead_lettered_at bigint NOT NULL,
        cause            text NOT NULL
    );
    CREATE INDEX dead_letters_holder ON dead_letters (holder, id);
    CREATE INDEX dead_letters_origin ON dead_letters (original_queue);
    CREATE TABLE maps (
        id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name  text COLLATE "C" NOT NULL UNIQUE,
        owner text
    );
    CREATE TABLE map_entries (
        map_id bigint NOT NULL,
        key    bytea NOT NULL,
        value  bytea NOT NULL,
        PRIMARY KEY (map_id, key)
    );
    CREATE TABLE users (
        name          text COLLATE "C" PRIMARY KEY,
        password_hash text NOT NULL,
        is_admin      boolean NOT NULL DEFAULT false
    );
    CREATE TABLE grants (
        username text COLLATE "C" NOT NULL,
        action   text NOT NULL,
        kind     text NOT NULL,
        pattern  text COLLATE "C" NOT NULL,
        PRIMARY KEY (username, action, kind, pattern)
    );
    CREATE TABLE idempotency_keys (
        username    text NOT NULL,
        request_id  text NOT NULL,
        fingerprint bytea NOT NULL,
        ids         bigint[] NOT NULL,
        created_at  bigint NOT NULL,
        PRIMARY KEY (username, request_id)
    );
    CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
    CREATE TABLE nodes (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        expires_at bigint NOT NULL
    );
    CREATE FUNCTION varint_size(v bigint) RETURNS integer
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        RETURN CASE WHEN v < 0 THEN 10 WHEN v < 128 THEN 1 WHEN v < 16384 THEN 2
            WHEN v < 2097152 THEN 3 WHEN v < 268435456 THEN 4 WHEN v < 34359738368 THEN 5
            WHEN v < 4398046511104 THEN 6 WHEN v < 562949953421312 THEN 7
            WHEN v < 72057594037927936 THEN 8 ELSE 9 END;
    CREATE FUNCTION element_info_inner(
        bytes integer, id bigint, n integer, enqueued bigint, lease bigint
    ) RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE
        RETURN CASE WHEN bytes > 0 THEN 1 + varint_size(bytes) + bytes ELSE 0 END
            + CASE WHEN id <> 0 THEN 1 + varint_size(id) ELSE 0 END
            + CASE WHEN n <> 0 THEN 1 + varint_size(n) ELSE 0 END
            + CASE WHEN enqueued <> 0 THEN 1 + varint_size(enqueued) ELSE 0 END
            + CASE WHEN lease <> 0 THEN 1 + varint_size(lease) ELSE 0 END;
    -- answer_size.element_info_size: what one delivery adds to its answer.
    CREATE FUNCTION element_info_size(
        bytes integer, id bigint, n integer, enqueued bigint, lease bigint
    ) RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE
        RETURN 1 + varint_size(element_info_inner(bytes, id, n, enqueued, lease))
            + element_info_inner(bytes, id, n, enqueued, lease);
    """,
    # 2: values every node shares, created once by the first node that needs them (the
    # server's key pair: pg_store.shared_secret).
    """
    CREATE TABLE cluster_secrets (
        name  text PRIMARY KEY,
        value bytea NOT NULL
    );
    """,
    # 3: login challenges used on any node (challenges.SignedChallenges), until expired.
    """
    CREATE TABLE used_challenges (
        nonce      bytea PRIMARY KEY,
        expires_at bigint NOT NULL
    );
    CREATE INDEX used_challenges_expiry ON used_challenges (expires_at);
    """,
)

# Queues -------------------------------------------------------------------------------------

QUEUE = "SELECT id, owner, settings FROM queues WHERE name = %s"
QUEUE_FOR_UPDATE = "SELECT id, owner, settings FROM queues WHERE name = %s FOR UPDATE"
QUEUE_NAMES_OF = "SELECT id, name, settings FROM queues WHERE id = ANY(%s)"
ALL_QUEUE_SETTINGS = "SELECT id, name, settings FROM queues WHERE settings IS NOT NULL"
COUNT_QUEUES = "SELECT count(*), count(*) FILTER (WHERE owner = %s) FROM queues"
INSERT_QUEUE = "INSERT INTO queues (name, owner, settings) VALUES (%s, %s, %s) RETURNING id"
SET_QUEUE_SETTINGS = "UPDATE queues SET settings = %s WHERE id = %s"
DELETE_QUEUE = "DELETE FROM queues WHERE id = %s"
DELETE_QUEUE_MESSAGES = "DELETE FROM messages WHERE queue_id = %s"
DELETE_HELD_DEAD_LETTERS = "DELETE FROM dead_letters WHERE holder = %s"
# Serializes changes of the queue set against each other (limits hold across nodes).
LOCK_QUEUE_SET = "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':queues'))"
LOCK_MAP_SET = "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':maps'))"

COUNTS = """
    SELECT count(*) FILTER (WHERE state = 0), count(*) FILTER (WHERE state = 1),
           count(*) FILTER (WHERE state = 2)
    FROM messages WHERE queue_id = %s
"""
COUNTS_OF_QUEUES = """
    SELECT q.name,
           (SELECT count(*) FROM messages m WHERE m.queue_id = q.id AND m.state = 0),
           (SELECT count(*) FROM messages m WHERE m.queue_id = q.id AND m.state = 1),
           (SELECT count(*) FROM messages m WHERE m.queue_id = q.id AND m.state = 2)
    FROM queues q WHERE q.name = ANY(%s) ORDER BY q.name
"""
QUEUE_NAMES_AFTER = "SELECT name FROM queues WHERE name > %s ORDER BY name LIMIT %s"
MAP_NAMES_AFTER = "SELECT name FROM maps WHERE name > %s ORDER BY name LIMIT %s"
HOLDING_SESSIONS = """
    SELECT count(*) FROM (SELECT DISTINCT owner_node, owner_session FROM messages
                          WHERE queue_id = %s AND state = 1) s
"""
# Messages in flight per session of this node (HeartBeat, ListSessions), by the
# messages_held index.
HELD_BY_SESSIONS = """
    SELECT owner_session, count(*) FROM messages
    WHERE state = 1 AND owner_node = %(node)s AND owner_session = ANY(%(sessions)s)
    GROUP BY owner_session
"""
OLDEST_READY = "SELECT min(enqueued_at) FROM messages WHERE queue_id = %s AND state = 0"
DEAD_LETTERED_FROM = "SELECT count(*) FROM dead_letters WHERE original_queue = %s"
DEAD_LETTERS_HELD = "SELECT count(*) FROM dead_letters WHERE holder = %s"

# Messages -----------------------------------------------------------------------------------

NEXT_IDS = "SELECT nextval('message_ids') FROM generate_series(1, %s)"
# One round trip for any number of elements; ids come from the sequence in element order.
ENQUEUE = f"""
    INSERT INTO messages (id, queue_id, state, payload, enqueued_at, ready_at)
    SELECT nextval('message_ids'), %(queue)s, %(state)s, p, {NOW}, {NOW} + %(delay)s
    FROM unnest(%(payloads)s::bytea[]) WITH ORDINALITY AS t(p, i) ORDER BY i
    RETURNING id
"""
# An add without a request_id to a queue without max_length: one statement, one round
# trip. It inserts nothing when the queue has a max_length (`bounded`), and the store
# then takes the transactional way (ENQUEUE, after counting under the queue's lock).
ENQUEUE_PLAIN = f"""
    WITH q AS (
        SELECT id, coalesce((settings::jsonb ->> 'max_length')::bigint, 0) AS bound,
               greatest(coalesce(%(delay)s::bigint,
                                 (settings::jsonb ->> 'delay_ms')::bigint, 0), 0) AS delay
        FROM queues WHERE name = %(name)s FOR KEY SHARE
    ), added AS (
        INSERT INTO messages (id, queue_id, state, payload, enqueued_at, ready_at)
        SELECT nextval('message_ids'), q.id, CASE WHEN q.delay > 0 THEN 2 ELSE 0 END, t.p,
               {NOW}, {NOW} + q.delay
        FROM q, unnest(%(payloads)s::bytea[]) WITH ORDINALITY AS t(p, i)
        WHERE q.bound = 0
        ORDER BY t.i
        RETURNING id
    )
    SELECT q.bound, q.delay, array(SELECT id FROM added ORDER BY id) FROM q
"""
LIVE_COUNT = "SELECT count(*) FROM messages WHERE queue_id = %s AND state <> 1"

# The claim: one statement. The oldest ready rows of the queue, locked and skipped when
# another claim holds them (SKIP LOCKED), cut where their answer would pass max_bytes
# (the first always comes), put in flight for the session.
CLAIM = f"""
    WITH q AS (
        SELECT id, coalesce(%(lease)s::bigint,
                            (settings::jsonb ->> 'ack_deadline_ms')::bigint, 0) AS lease
        FROM queues WHERE name = %(name)s
    ), locked AS (
        SELECT m.id, octet_length(m.payload) AS bytes, m.delivery_count, m.enqueued_at
        FROM messages m
        WHERE m.queue_id = (SELECT id FROM q) AND m.state = 0
        ORDER BY m.id LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ), deadline AS (
        SELECT CASE WHEN lease > 0 THEN {NOW} + lease ELSE 0 END AS at FROM q
    ), sized AS (
        SELECT l.id,
               sum(element_info_size(l.bytes, l.id, l.delivery_count + 1, l.enqueued_at,
                                     (SELECT at FROM deadline)))
                   OVER (ORDER BY l.id) AS total,
               row_number() OVER (ORDER BY l.id) AS n
        FROM locked l
    )
    UPDATE messages m
    SET state = 1, owner_node = %(node)s, owner_session = %(session)s,
        delivery_count = m.delivery_count + 1, lease_deadline = (SELECT at FROM deadline)
    FROM sized
    WHERE m.id = sized.id AND (sized.n = 1 OR sized.total <= %(max_bytes)s)
    RETURNING m.id, m.payload, m.delivery_count, m.enqueued_at, m.lease_deadline
"""

# An ack: fenced by the holder (node and session); a row held by anyone else is untouched.
ACK_DONE = """
    WITH gone AS (
        DELETE FROM messages
        WHERE id = ANY(%(ids)s) AND state = 1 AND owner_node = %(node)s
          AND owner_session = %(session)s
        RETURNING id, queue_id
    ), history AS (
        DELETE FROM dead_letters d USING gone WHERE d.id = gone.id
    )
    SELECT id, queue_id FROM gone
"""
# A release: ready again at once; the caller then applies backoff and max_deliveries.
RELEASE_IDS = """
    UPDATE messages
    SET state = 0, owner_node = NULL, owner_session = NULL, lease_deadline = 0
    WHERE id = ANY(%(ids)s) AND state = 1 AND owner_node = %(node)s
      AND owner_session = %(session)s
    RETURNING id, queue_id, delivery_count
"""
RELEASE_SESSION = """
    UPDATE messages
    SET state = 0, owner_node = NULL, owner_session = NULL, lease_deadline = 0
    WHERE state = 1 AND owner_node = %(node)s AND owner_session = %(session)s
    RETURNING id, queue_id, delivery_count
"""
FORGET_EXPIRED_HOLDER = """
    UPDATE messages SET expired_node = NULL, expired_session = NULL
    WHERE expired_node = %(node)s AND expired_session = %(session)s
"""
RELEASE_NODE = """
    UPDATE messages
    SET state = 0, owner_node = NULL, owner_session = NULL, lease_deadline = 0
    WHERE state = 1 AND owner_node = %(node)s
    RETURNING id, queue_id, delivery_count
"""
EXPIRED_BY = """
    SELECT id FROM messages
    WHERE id = ANY(%(ids)s) AND expired_node = %(node)s AND expired_session = %(session)s
"""
EXTEND = f"""
    UPDATE messages SET lease_deadline = {NOW} + %(lease)s
    WHERE id = ANY(%(ids)s) AND state = 1 AND owner_node = %(node)s
      AND owner_session = %(session)s
    RETURNING id, lease_deadline
"""
# Leases whose deadline passed: released by whichever node runs this first; the row
# update makes it exactly once. The holder is remembered for its late ack.
EXPIRE_LEASES = f"""
    WITH due AS (
        SELECT id FROM messages
        WHERE state = 1 AND lease_deadline > 0 AND lease_deadline <= {NOW}
        ORDER BY lease_deadline LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    UPDATE messages m
    SET state = 0, expired_node = m.owner_node, expired_session = m.owner_session,
        owner_node = NULL, owner_session = NULL, lease_deadline = 0
    FROM due WHERE m.id = due.id
    RETURNING m.id, m.queue_id, m.delivery_count
"""
COME_DUE = f"""
    WITH due AS (
        SELECT id FROM messages WHERE state = 2 AND ready_at <= {NOW}
        ORDER BY ready_at LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    UPDATE messages m SET state = 0, ready_at = 0
    FROM due WHERE m.id = due.id
    RETURNING m.queue_id
"""
# Nodes whose heartbeat stopped: deleted by one node, whose transaction then releases
# what their sessions held.
# SKIP LOCKED: a node heartbeating at this moment is alive, and two sweeping nodes that
# each find the other expired (after a long outage) skip each other instead of deadlocking.
DEAD_NODES = f"""
    DELETE FROM nodes WHERE id IN (
        SELECT id FROM nodes WHERE expires_at <= {NOW} AND id <> %(node)s
        FOR UPDATE SKIP LOCKED)
    RETURNING id
"""
# Whether this node's row was still alive when it came to renew it.
NODE_ALIVE = f"SELECT expires_at > {NOW} FROM nodes WHERE id = %(node)s"
REGISTER_NODE = f"INSERT INTO nodes (expires_at) VALUES ({NOW} + %(ttl)s) RETURNING id"
HEARTBEAT = f"""
    INSERT INTO nodes (id, expires_at) OVERRIDING SYSTEM VALUE VALUES (%(node)s, {NOW} + %(ttl)s)
    ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at
"""
DELETE_NODE = "DELETE FROM nodes WHERE id = %s"
NEXT_DUE = f"""
    SELECT least(
        (SELECT min(lease_deadline) FROM messages WHERE state = 1 AND lease_deadline > 0),
        (SELECT min(ready_at) FROM messages WHERE state = 2)) - {NOW}
"""

# Rows moved by releases, delays and dead letters.
TO_WAITING = f"""
    UPDATE messages SET state = 2, ready_at = {NOW} + w.wait
    FROM unnest(%(ids)s::bigint[], %(waits)s::bigint[]) AS w(id, wait)
    WHERE messages.id = w.id
"""
DEAD_LETTER = f"""
    WITH moved AS (
        UPDATE messages SET queue_id = %(target)s, state = 0, ready_at = 0
        WHERE id = ANY(%(ids)s) RETURNING id, delivery_count
    )
    INSERT INTO dead_letters (id, holder, original_queue, delivery_count, dead_lettered_at, cause)
    SELECT id, %(target)s, %(origin)s, delivery_count, {NOW}, %(cause)s FROM moved
    ON CONFLICT (id) DO UPDATE SET holder = excluded.holder,
        original_queue = excluded.original_queue, delivery_count = excluded.delivery_count,
        dead_lettered_at = excluded.dead_lettered_at, cause = excluded.cause
"""
OLDEST_READY_ROWS = """
    SELECT id, enqueued_at FROM messages WHERE queue_id = %s AND state = 0
    ORDER BY id LIMIT %s
"""
DELETE_IDS = """
    WITH gone AS (DELETE FROM messages WHERE id = ANY(%(ids)s) RETURNING id),
    history AS (DELETE FROM dead_letters d USING gone WHERE d.id = gone.id)
    SELECT count(*) FROM gone
"""
GET_SECRET = "SELECT value FROM cluster_secrets WHERE name = %s"
PUT_SECRET = "INSERT INTO cluster_secrets (name, value) VALUES (%s, %s)"

# A challenge's one use: refused when its nonce was used or its expiry has passed.
BURN_CHALLENGE = f"""
    INSERT INTO used_challenges (nonce, expires_at)
    SELECT %(nonce)s, %(expires)s WHERE %(expires)s::bigint > {NOW}
    ON CONFLICT (nonce) DO NOTHING
"""
PRUNE_CHALLENGES = f"""
    DELETE FROM used_challenges WHERE nonce IN (
        SELECT nonce FROM used_challenges WHERE expires_at <= {NOW}
        LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
"""

# The fallback's recheck (pg_store._recheck): of the queues named, which exist and which
# hold a ready message (one index probe each).
RECHECK_QUEUES = """
    SELECT n.name, q.id IS NOT NULL,
        EXISTS (SELECT 1 FROM messages m WHERE m.queue_id = q.id AND m.state = 0)
    FROM unnest(%s::text[]) AS n(name) LEFT JOIN queues q ON q.name = n.name
"""
PURGE = """
    WITH gone AS (DELETE FROM messages WHERE queue_id = %s AND state <> 1 RETURNING id),
    history AS (DELETE FROM dead_letters d USING gone WHERE d.id = gone.id)
    SELECT count(*) FROM gone
"""
HELD_DEAD_LETTERS = """
    SELECT d.id, d.original_queue, m.state FROM dead_letters d JOIN messages m ON m.id = d.id
    WHERE d.holder = %s ORDER BY d.id FOR UPDATE OF m
"""
HELD_DEAD_LETTERS_OF = """
    SELECT d.id, d.original_queue, m.state FROM dead_letters d JOIN messages m ON m.id = d.id
    WHERE d.holder = %s AND d.id = ANY(%s) ORDER BY d.id FOR UPDATE OF m
"""
REDRIVE = """
    WITH moved AS (
        UPDATE messages SET queue_id = %(target)s, state = 0, ready_at = 0
        WHERE id = ANY(%(ids)s) RETURNING id
    )
    DELETE FROM dead_letters d USING moved WHERE d.id = moved.id
"""
DEAD_LETTERS_PAGE = """
    SELECT d.id, d.original_queue, d.delivery_count, m.enqueued_at, d.dead_lettered_at,
           d.cause, m.payload
    FROM dead_letters d JOIN messages m ON m.id = d.id
    WHERE d.holder = %s AND d.id > %s ORDER BY d.id LIMIT %s
"""

# Idempotency keys ---------------------------------------------------------------------------

IDEMPOTENCY_KEY = """
    SELECT fingerprint, ids, created_at FROM idempotency_keys
    WHERE username = %s AND request_id = %s FOR UPDATE
"""
PUT_IDEMPOTENCY_KEY = f"""
    INSERT INTO idempotency_keys (username, request_id, fingerprint, ids, created_at)
    VALUES (%(user)s, %(request)s, %(fingerprint)s, %(ids)s, {NOW})
    ON CONFLICT (username, request_id) DO UPDATE SET fingerprint = excluded.fingerprint,
        ids = excluded.ids, created_at = excluded.created_at
"""
PRUNE_IDEMPOTENCY_KEYS = f"""
    DELETE FROM idempotency_keys WHERE (username, request_id) IN (
        SELECT username, request_id FROM idempotency_keys
        WHERE created_at <= {NOW} - %(window)s ORDER BY created_at LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
"""
# Takes the adds of one key in turn: two repeats at once answer the same ids.
LOCK_IDEMPOTENCY_KEY = "SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))"

# Maps ---------------------------------------------------------------------------------------

MAP_ID = "SELECT id FROM maps WHERE name = %s"
COUNT_MAPS = "SELECT count(*), count(*) FILTER (WHERE owner = %s) FROM maps"
INSERT_MAP = "INSERT INTO maps (name, owner) VALUES (%s, %s) RETURNING id"
PUT_ENTRIES = """
    INSERT INTO map_entries (map_id, key, value)
    SELECT %s, k, v FROM unnest(%s::bytea[], %s::bytea[]) AS t(k, v)
    ON CONFLICT (map_id, key) DO UPDATE SET value = excluded.value
"""
DELETE_ENTRY = "DELETE FROM map_entries WHERE map_id = %s AND key = %s"
GET_ENTRY = "SELECT value FROM map_entries WHERE map_id = %s AND key = %s"
ALL_ENTRIES = "SELECT key, value FROM map_entries WHERE map_id = %s ORDER BY key"
PAGE_ENTRIES = (
    "SELECT key, value FROM map_entries WHERE map_id = %s ORDER BY key LIMIT %s OFFSET %s"
)
PAGE_ENTRIES_AFTER = """
    SELECT key, value FROM map_entries
    WHERE map_id = %s AND (%s::bytea IS NULL OR key > %s::bytea) ORDER BY key LIMIT %s
"""
DELETE_MAP_ENTRIES = "DELETE FROM map_entries WHERE map_id = %s"
DELETE_MAP = "DELETE FROM maps WHERE id = %s"

# Users --------------------------------------------------------------------------------------

GET_USER = "SELECT name, password_hash, is_admin FROM users WHERE name = %s"
LIST_USERS = "SELECT name, password_hash, is_admin FROM users ORDER BY name"
COUNT_USERS = "SELECT count(*) FROM users"
CREATE_USER = (
    "INSERT INTO users (name, password_hash, is_admin) VALUES (%s, %s, %s)"
    " ON CONFLICT (name) DO NOTHING"
)
SET_PASSWORD = "UPDATE users SET password_hash = %s, is_admin = is_admin OR %s WHERE name = %s"
USER_EXISTS = "SELECT 1 FROM users WHERE name = %s FOR UPDATE"
DELETE_USER_GRANTS = "DELETE FROM grants WHERE username = %s"
DELETE_USER = "DELETE FROM users WHERE name = %s"
ADD_GRANT = (
    "INSERT INTO grants (username, action, kind, pattern) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT DO NOTHING"
)
REMOVE_GRANT = (
    "DELETE FROM grants WHERE username = %s AND action = %s AND kind = %s AND pattern = %s"
)
ALL_GRANTS = "SELECT username, action, kind, pattern FROM grants ORDER BY 1, 2, 3, 4"
