"""Server configuration: every setting declared once, with its default and its flag.

Each field that an operator may set carries its command-line flag and help text in its
metadata (`setting(...)`); `qm_server.flags` builds the parser from these declarations and
reads the parsed values back, so a limit is named, defaulted and documented in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qm_server.answer_size import (
    ACK_RESULT_BYTES,
    element_info_size,
    entries_room,
    key_value_size,
)

MIB = 1024 * 1024


DURABILITY_MODES = ("full", "process-crash")


def setting(
    default: Any,
    help: str,
    *,
    flag: str = "",
    metavar: str = "",
    choices: tuple[str, ...] = (),
) -> Any:
    """A field that `qm-server` exposes as `flag` (default: --the-field-name)."""
    metadata = {"flag": flag, "help": help, "metavar": metavar, "choices": choices}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Limits:
    """Limits the engine enforces; each answered with a clear code, nothing half-done."""

    max_element_bytes: int = setting(MIB, "largest element, map key or map value (UTF-8 bytes)")
    max_batch: int = setting(1000, "most elements, ids or pairs in one call")
    max_page: int = setting(
        1000,
        "most entries in one MapGetList, ListQueues, ListMaps, ListDeadLetters or ListSessions"
        " page",
    )
    max_queues: int = setting(10_000, "queues that may exist at once")
    max_maps: int = setting(10_000, "maps that may exist at once")
    max_wait_ms: int = setting(20_000, "longest wait_ms a long poll is granted")
    # Each parked long poll or open stream costs a little memory, so a flood of idle
    # consumers is refused (RESOURCE_EXHAUSTED) rather than absorbed.
    max_waiting_polls: int = setting(10_000, "long polls parked at once")
    max_subscriptions: int = setting(10_000, "Subscribe streams open at once")
    # Each login costs memory until it expires.
    max_sessions: int = setting(100_000, "live sessions")
    # What one user other than an admin may hold (quotas.py): sessions, parked long
    # polls, open Subscribe streams, and queues and maps created by them (kept across
    # restarts). Past it: RESOURCE_EXHAUSTED.
    max_sessions_per_user: int = setting(1000, "live sessions of one user other than an admin")
    max_waiting_polls_per_user: int = setting(
        1000, "long polls parked at once by one user other than an admin"
    )
    max_subscriptions_per_user: int = setting(
        1000, "open Subscribe streams of one user other than an admin"
    )
    max_queues_per_user: int = setting(
        1000, "queues created by one user other than an admin (kept across restarts)"
    )
    max_maps_per_user: int = setting(
        1000, "maps created by one user other than an admin (kept across restarts)"
    )
    # One or many users filling a limit cannot lock the admins out too.
    admin_reserve_percent: int = setting(
        5,
        "share of the limits on sessions, waiting polls, subscriptions, queues and maps "
        "that only admins may use (rounded down)",
    )
    # gRPC's default receive limit, so that a client with default settings receives every
    # answer. PullElements, Subscribe pushes and MapGetList pages stop adding entries
    # before it (the first entry always comes, and always fits: see __post_init__).
    # Raising it needs every client to raise its receive limit as well.
    max_response_bytes: int = setting(
        4 * MIB,
        "largest answer, encoded and framed (gRPC's default receive limit); "
        "MapGetAll past it answers RESOURCE_EXHAUSTED (page with MapGetList)",
    )
    # Each read is counted at its largest possible answer; further reads wait their turn,
    # so that many concurrent big reads cannot grow the server without bound.
    max_reads_in_progress_bytes: int = setting(
        32 * MIB, "map reads being read and built at once, each counted at its largest answer"
    )

    def __post_init__(self) -> None:
        # One entry of the largest size must fit in an answer alone, or it could be
        # neither delivered nor skipped: a map key and value, each max_element_bytes, or
        # an element beside an AckResult for each id of a full batch (a Subscribe refill).
        largest = max(
            key_value_size(self.max_element_bytes, self.max_element_bytes),
            element_info_size(self.max_element_bytes, 2**63 - 1, 2**63 - 1)
            + ACK_RESULT_BYTES * self.max_batch,
        )
        if largest > entries_room(self.max_response_bytes):
            raise ValueError(
                f"max_response_bytes {self.max_response_bytes} cannot hold one entry of "
                f"max_element_bytes {self.max_element_bytes} (a key and a value)"
            )
        if self.max_reads_in_progress_bytes < self.max_response_bytes:
            raise ValueError("max_reads_in_progress_bytes must hold one largest answer")


@dataclass(frozen=True)
class AuthSettings:
    """Login parameters: key size, challenge lifetime, scrypt cost and throttling."""

    rsa_bits: int = setting(3072, "size of the key created on first start")
    challenge_ttl_s: float = 60.0
    max_pending_challenges: int = 100_000
    # scrypt cost: n=2**14, r=8 takes tens of milliseconds and 16 MiB per hash.
    scrypt_n: int = 2**14
    scrypt_r: int = 8
    scrypt_p: int = 1
    # Each hash costs CPU and 16 MiB.
    max_concurrent_hashes: int = setting(2, "password hashes computed at once")
    # Failed logins are counted per (user, host) pair and per host, never per user alone:
    # otherwise anyone could keep a user out by failing as that user (see login_guard.py).
    # Past this many failures of one user from one host, that user's logins from that
    # host are refused (RESOURCE_EXHAUSTED) for a backoff that doubles with each further
    # failure, up to max_backoff_s.
    failures_before_backoff: int = setting(
        5,
        "failed logins of one user from one host before backoff starts",
        flag="--login-failures",
    )
    max_backoff_s: float = 60.0
    # The same for one host whatever the user names (guessing many users' passwords).
    host_failures_before_backoff: int = setting(
        20,
        "failed logins from one host, whatever the user, before backoff starts",
        flag="--host-login-failures",
    )
    # Past this many recent failures of one user from all hosts together, each host gets
    # one failure for that user before its backoff starts, instead of
    # failures_before_backoff: a guess spread over many hosts is slowed, and a host with
    # no failure for the user is still never refused.
    user_failures_ceiling: int = setting(
        100,
        "failed logins of one user from all hosts past which each host gets one",
        flag="--user-login-failures",
    )
    # A count with no new failure for this long is forgotten.
    forget_failures_after_s: float = 900.0
    # Logins from one host are judged one at a time, so that a flood from one host holds
    # at most one of the max_concurrent_hashes workers; at most this many more wait their
    # turn, and further ones are refused at once.
    logins_waiting_per_host: int = 32


@dataclass(frozen=True)
class TlsSettings:
    """Server certificate and key (PEM files); a client CA turns on mutual TLS."""

    cert: Path | None = setting(None, "server certificate chain (PEM)", flag="--tls-cert")
    key: Path | None = setting(None, "server private key (PEM)", flag="--tls-key")
    client_ca: Path | None = setting(
        None, "require client certificates signed by this CA", flag="--tls-client-ca"
    )

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class KeepaliveSettings:
    """HTTP/2 keepalive: the server pings idle connections to find dead peers, and
    answers clients that ping more often than allowed with GOAWAY (too_many_pings)."""

    time_ms: int = 60_000
    timeout_ms: int = 20_000
    min_client_ping_interval_ms: int = setting(
        10_000,
        "clients pinging more often than this get GOAWAY (too_many_pings)",
        flag="--min-ping-interval-ms",
    )
    max_ping_strikes: int = 2


@dataclass(frozen=True)
class ServerConfig:
    """What `qm-server` runs with; the command line fills it."""

    data_dir: Path = setting(Path("qm-data"), "where the database and the key live")
    # Empty: the embedded SQLite store in data_dir. A postgresql:// URL: the PostgreSQL
    # store (store/pg_store.py), which several nodes may share; data_dir then keeps the key.
    store: str = setting(
        "",
        "postgresql://user@host/db to keep queues, maps and users in PostgreSQL "
        "(default: the embedded SQLite database in --data-dir)",
        metavar="URL",
    )
    store_schema: str = setting(
        "qm", "the PostgreSQL schema that holds the store's tables (created if missing)"
    )
    store_no_notify: bool = setting(
        False,
        "do not wake other nodes through LISTEN/NOTIFY (for a PostgreSQL-compatible "
        "database without it): they find new messages by polling, within a second",
    )
    listen: str = setting(
        "127.0.0.1:50051", "address to serve on (port 0: any free)", metavar="HOST:PORT"
    )
    # Empty: no metrics endpoint at all (metrics.py).
    metrics_listen: str = setting(
        "",
        "serve Prometheus metrics on http://HOST:PORT/metrics (default: off)",
        metavar="HOST:PORT",
    )
    session_ttl_s: float = setting(
        30.0,
        "idle time after which a session expires and its messages are released",
        flag="--session-ttl",
        metavar="SECONDS",
    )
    grace_s: float = setting(
        5.0, "how long calls in progress may finish at shutdown", flag="--grace", metavar="SECONDS"
    )
    # Larger requests fail with gRPC RESOURCE_EXHAUSTED before the service sees them.
    max_request_bytes: int = setting(8 * MIB, "largest request the transport accepts")
    max_concurrent_rpcs: int | None = setting(None, "calls in progress at once (default: any)")
    # Bounds what one client that never reads its answers can make the server hold (about
    # 5 answers' worth each). Off by default: measured with grpcio 1.85, a limit of 100
    # already refused a grpc.aio client's calls (REFUSED_STREAM, seen as UNAVAILABLE) at
    # 64 in flight.
    max_streams_per_connection: int | None = setting(
        None, "HTTP/2 streams per connection (default: unlimited)"
    )
    admin_password: str | None = None
    # Never weaker by default; store/sqlite_file.py's SYNCHRONOUS maps each mode.
    durability: str = setting(
        "full",
        "full: fsync before every answer (survives power loss); process-crash: "
        "faster, survives kill -9 but may lose the last answers on power loss",
        choices=DURABILITY_MODES,
    )
    # The integrity check at start (PRAGMA quick_check) is abandoned with a warning past
    # this; `qm-server check` runs the full check.
    start_check_s: float = setting(
        10.0,
        "check the database's integrity at start for this long at most (0: skip)",
        flag="--start-check-seconds",
        metavar="SECONDS",
    )
    # Without it, a directory whose key shows that it held a database which is gone is
    # refused (datadir.py).
    new_database: bool = setting(
        False,
        "start with a new, empty database although the data directory's key shows that it "
        "held one (which is gone)",
    )
    # Without it, a directory whose database holds users but whose key is gone is refused:
    # the server's identity would change silently (datadir.py).
    new_key: bool = setting(
        False,
        "create a new server key although the database shows the directory had one (which "
        "is gone); clients that pinned the old key's fingerprint must pin the new one",
    )
    # As large as the write-ahead log the store keeps at most (store/reserve.py).
    disk_reserve_bytes: int = setting(
        64 * MIB, "disk space set aside so that a full disk can still be drained (0: none)"
    )
    # A repeat of an Add or AddAll with the same request_id by the same user within this
    # window answers the first call's ids and adds nothing (kept in the database, so across
    # restarts too); past it, the request_id is free again.
    idempotency_window_s: float = setting(
        600.0,
        "how long an Add or AddAll request_id is remembered (a repeat adds nothing)",
        flag="--idempotency-window",
        metavar="SECONDS",
    )
    tls: TlsSettings = field(default_factory=TlsSettings)
    # Plaintext is allowed on loopback addresses only, unless this is set.
    allow_plaintext: bool = setting(
        False, "allow plaintext on a non-loopback address (tokens cross the network in clear)"
    )
    keepalive: KeepaliveSettings = field(default_factory=KeepaliveSettings)
    limits: Limits = field(default_factory=Limits)
    auth: AuthSettings = field(default_factory=AuthSettings)
