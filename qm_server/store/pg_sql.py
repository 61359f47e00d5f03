"""Every statement of the PostgreSQL store, and its schema's migrations (pg_migrate.py
applies them).

Tables live in the store's schema (the connection's search_path), so statements name
them unqualified. Times are Unix epoch milliseconds (bigint), like the interface's, and
"now" is one SQL expression (NOW): the database's clock, `now()`, which is the start of
the transaction, so that every node agrees on when a lease ends. A test passes its fake
clock's time as the `now` parameter instead (PgStore's `clock`).

A message is one row of `messages` through its whole life; `state` says where it is:
READY (claimable), HELD (in flight: owner session, lease deadline) or WAITING
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
    # 4: failed logins counted for every node (store/pg_login_failures.py).
    """
    CREATE TABLE login_failures (
        kind           smallint NOT NULL,
        key            text COLLATE "C" NOT NULL,
        failures       integer NOT NULL,
        refused_until  bigint NOT NULL,
        last_failure   bigint NOT NULL,
        refusal_logged boolean NOT NULL DEFAULT false,
        PRIMARY KEY (kind, key)
    );
    CREATE INDEX login_failures_last ON login_failures (last_failure);
    """,
    # 5: sessions every node sees (pg_sessions.py); a message in flight is held by its
    # session alone, whose id is unique across nodes, so nodes need no table of their own.
    # Rows held by a node's session before this (ids unique only on that node) have no
    # session row: the first sweep releases them as orphans.
    """
    CREATE TABLE sessions (
        id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        token_digest   bytea NOT NULL UNIQUE,
        username       text COLLATE "C" NOT NULL,
        credential     text NOT NULL,
        peer           text NOT NULL,
        created_at     bigint NOT NULL,
        last_active_at bigint NOT NULL
    );
    CREATE INDEX sessions_idle ON sessions (last_active_at);
    CREATE INDEX sessions_user ON sessions (username);
    DROP INDEX messages_held, messages_expired;
    ALTER TABLE messages DROP COLUMN owner_node, DROP COLUMN expired_node;
    CREATE INDEX messages_held ON messages (owner_session) WHERE state = 1;
    CREATE INDEX messages_expired ON messages (expired_session)
        WHERE expired_session IS NOT NULL;
    DROP TABLE nodes;
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
    SELECT count(*) FROM (SELECT DISTINCT owner_session FROM messages
                          WHERE queue_id = %s AND state = 1) s
"""
# Messages in flight per session (HeartBeat, ListSessions), by the
# messages_held index.
HELD_BY_SESSIONS = """
    SELECT owner_session, count(*) FROM messages
    WHERE state = 1 AND owner_session = ANY(%(sessions)s)
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
_CLAIM_STEPS = f"""
    q AS (
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
    ), inner_sized AS (
        -- element_info_size(...) in two steps, with every argument a column: the planner
        -- inlines an SQL function only when no argument is a subquery or an expression it
        -- would have to evaluate twice, and run as functions the size functions cost the
        -- database about 35 us a claimed row. OFFSET 0 keeps the step a step.
        SELECT l.id,
               element_info_inner(l.bytes, l.id, l.delivery_count + 1, l.enqueued_at, d.at)
                   AS inner_bytes
        FROM locked l CROSS JOIN deadline d OFFSET 0
    ), sized AS (
        SELECT s.id,
               sum(1 + varint_size(s.inner_bytes) + s.inner_bytes) OVER (ORDER BY s.id)
                   AS total,
               row_number() OVER (ORDER BY s.id) AS n
        FROM inner_sized s
    )
"""
# The rows to update as an array of ids, not a join with `sized`: on statistics that
# call the table empty (a VACUUM of a table that churns sets them so, and ANALYZE may
# not have run since) a join was planned as a walk of the whole primary key with
# `sized` rescanned for every row (2.3 s for a claim of 100 beside 10,000 rows); an
# array leaves one plan, a lookup of each id in the primary key.
_CLAIM_UPDATE = """
    UPDATE messages m
    SET state = 1, owner_session = %(session)s,
        delivery_count = m.delivery_count + 1, lease_deadline = (SELECT at FROM deadline)
    WHERE m.id = ANY(ARRAY(
        SELECT id FROM sized WHERE sized.n = 1 OR sized.total <= %(max_bytes)s))
    RETURNING m.id, m.payload, m.delivery_count, m.enqueued_at, m.lease_deadline
"""
CLAIM = f"WITH {_CLAIM_STEPS} {_CLAIM_UPDATE}"

# An ack: fenced by the holder session; a row held by anyone else is untouched.
# The acked rows are found by their ids alone (the primary key): the `+ 0` keeps the
# holder's columns from matching the held and not-ready indexes, which a plan on stale
# statistics (a table that grew since its last ANALYZE) would otherwise walk, every row
# the session holds, to find the few acked (71 ms instead of 0.2 ms for 100 of 50,000).
_ACK_STEPS = """
    gone AS (
        DELETE FROM messages
        WHERE id = ANY(%(ids)s) AND state + 0 = 1 AND owner_session + 0 = %(session)s
        RETURNING id, queue_id
    ), history AS (
        DELETE FROM dead_letters d USING gone WHERE d.id = gone.id
    )
"""
ACK_DONE = f"WITH {_ACK_STEPS} SELECT id, queue_id FROM gone"

# A stream's ack and refill: the ack and the claim in ONE statement, so one round trip and
# one commit (one WAL flush to wait for) instead of two. The acked rows are held and the
# claimed ones ready, so the two never meet. Rows by kind (pg_claims.split): ACKED ids,
# CLAIMED deliveries, and one QUEUE row whose id column says whether the queue exists.
ACK_AND_CLAIM = f"""
    WITH {_ACK_STEPS}, {_CLAIM_STEPS}, claimed AS ({_CLAIM_UPDATE})
    SELECT 0, id, NULL::bytea, 0, 0::bigint, 0::bigint FROM gone
    UNION ALL
    SELECT 1, id, payload, delivery_count, enqueued_at, lease_deadline FROM claimed
    UNION ALL
    SELECT 2, count(*), NULL::bytea, 0, 0::bigint, 0::bigint FROM q
"""
# A release: ready again at once; the caller then applies backoff and max_deliveries.
# By id alone, as the ack (the `+ 0`: see _ACK_STEPS), here and in EXPIRED_BY and EXTEND.
RELEASE_IDS = """
    UPDATE messages
    SET state = 0, owner_session = NULL, lease_deadline = 0
    WHERE id = ANY(%(ids)s) AND state + 0 = 1 AND owner_session + 0 = %(session)s
    RETURNING id, queue_id, delivery_count
"""
RELEASE_SESSION = """
    UPDATE messages
    SET state = 0, owner_session = NULL, lease_deadline = 0
    WHERE state = 1 AND owner_session = ANY(%(sessions)s)
    RETURNING id, queue_id, delivery_count
"""
FORGET_EXPIRED_HOLDER = """
    UPDATE messages SET expired_session = NULL
    WHERE expired_session = ANY(%(sessions)s)
"""
EXPIRED_BY = """
    SELECT id FROM messages
    WHERE id = ANY(%(ids)s) AND expired_session + 0 = %(session)s
"""
EXTEND = f"""
    UPDATE messages SET lease_deadline = {NOW} + %(lease)s
    WHERE id = ANY(%(ids)s) AND state + 0 = 1 AND owner_session + 0 = %(session)s
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
    SET state = 0, expired_session = m.owner_session, owner_session = NULL,
        lease_deadline = 0
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

# Sessions (pg_sessions.py) ------------------------------------------------------------------

# Serializes logins against each other, so that the session limits hold across nodes.
LOCK_SESSION_SET = "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':sessions'))"
COUNT_SESSIONS = "SELECT count(*), count(*) FILTER (WHERE username = %s) FROM sessions"
INSERT_SESSION = f"""
    INSERT INTO sessions (token_digest, username, credential, peer, created_at, last_active_at)
    VALUES (%(digest)s, %(user)s, %(credential)s, %(peer)s, {NOW}, {NOW})
    RETURNING id, created_at
"""
SESSION_COLUMNS = f"id, username, credential, peer, created_at, {NOW} - last_active_at"
# A token's session, if its user still has the password it logged in with: a session no
# node holds is ended by nobody's reload of the users (engine.refresh_permissions), so
# the lookup refuses it here; it expires after the TTL.
FIND_SESSION = f"""
    SELECT {SESSION_COLUMNS} FROM sessions
    WHERE token_digest = %(digest)s AND EXISTS (
        SELECT 1 FROM users WHERE name = username AND password_hash = credential)
"""
GET_SESSION = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = %(id)s"
PAGE_SESSIONS = f"""
    SELECT {SESSION_COLUMNS} FROM sessions
    WHERE id > %(after)s AND (%(user)s::text = '' OR username = %(user)s)
    ORDER BY id LIMIT %(limit)s
"""
# The batched write of last activity, one statement per flush; sessions gone are missing
# from what it returns.
TOUCH_SESSIONS = f"""
    UPDATE sessions SET last_active_at = greatest(last_active_at, {NOW})
    WHERE id = ANY(%(ids)s) RETURNING id
"""
LIVE_SESSIONS = "SELECT id FROM sessions WHERE id = ANY(%(ids)s)"
DELETE_SESSION = "DELETE FROM sessions WHERE id = %(id)s RETURNING id"
# Expired sessions: deleted by one node, whose transaction then releases what they held.
# SKIP LOCKED: a session being touched at this moment is alive, and two sweeping nodes
# skip each other's rows instead of waiting.
DELETE_EXPIRED_SESSIONS = f"""
    DELETE FROM sessions WHERE id IN (
        SELECT id FROM sessions WHERE last_active_at <= {NOW} - %(ttl)s
        ORDER BY last_active_at LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
    RETURNING id
"""
# Held by no session that exists: a claim that committed after its session was deleted
# (pg_sessions.py says why claims do not check). Released by whichever node sweeps first.
RELEASE_ORPHANS = """
    UPDATE messages m
    SET state = 0, owner_session = NULL, lease_deadline = 0
    WHERE m.state = 1 AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = m.owner_session)
    RETURNING m.id, m.queue_id, m.delivery_count
"""
