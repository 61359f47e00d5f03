"""Server configuration: every limit in one place, each with the default the contract names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Limits the engine enforces; each answered with a clear code, nothing half-done."""

    max_element_bytes: int = MIB
    max_batch: int = 1000
    max_page: int = 1000
    max_queues: int = 10_000
    max_maps: int = 10_000
    max_wait_ms: int = 20_000
    # Long polls parked at once, and open Subscribe streams: each costs a little memory,
    # so a flood of idle consumers is refused (RESOURCE_EXHAUSTED) rather than absorbed.
    max_waiting_polls: int = 10_000
    max_subscriptions: int = 10_000
    # Live sessions: each login costs memory until it expires.
    max_sessions: int = 100_000
    # What one user other than an admin may hold (quotas.py): sessions, parked long
    # polls, open Subscribe streams, and queues and maps created by them (kept across
    # restarts). Past it: RESOURCE_EXHAUSTED.
    max_sessions_per_user: int = 1000
    max_waiting_polls_per_user: int = 1000
    max_subscriptions_per_user: int = 1000
    max_queues_per_user: int = 1000
    max_maps_per_user: int = 1000
    # Of each server-wide limit on sessions, waiting polls, subscriptions, queues and
    # maps, this share (rounded down) is kept for admins: one or many users filling a
    # limit cannot lock the admins out too.
    admin_reserve_percent: int = 5
    # PullElements stops adding messages once a response holds this many payload bytes,
    # so that a batch of large elements never exceeds what a client can receive.
    max_response_bytes: int = 4 * MIB
    # MapGetAll answers the whole map or, past this many bytes, RESOURCE_EXHAUSTED (page
    # with MapGetList instead): an answer must not grow without bound.
    max_map_get_all_bytes: int = 64 * MIB


@dataclass(frozen=True)
class AuthSettings:
    """Login parameters: key size, challenge lifetime, scrypt cost and throttling."""

    rsa_bits: int = 3072
    challenge_ttl_s: float = 60.0
    max_pending_challenges: int = 100_000
    # scrypt cost: n=2**14, r=8 takes tens of milliseconds and 16 MiB per hash.
    scrypt_n: int = 2**14
    scrypt_r: int = 8
    scrypt_p: int = 1
    # How many password hashes may run at once (each costs CPU and 16 MiB).
    max_concurrent_hashes: int = 2
    # Failed logins are counted per (user, host) pair and per host, never per user alone:
    # otherwise anyone could keep a user out by failing as that user (see login_guard.py).
    # After this many failures of one user from one host, that user's logins from that
    # host are refused (RESOURCE_EXHAUSTED) for a backoff that doubles with each further
    # failure, up to max_backoff_s.
    failures_before_backoff: int = 5
    max_backoff_s: float = 60.0
    # The same for one host whatever the user names (guessing many users' passwords).
    host_failures_before_backoff: int = 20
    # Past this many recent failures of one user from all hosts together, each host gets
    # one failure for that user before its backoff starts, instead of
    # failures_before_backoff: a guess spread over many hosts is slowed, and a host with
    # no failure for the user is still never refused.
    user_failures_ceiling: int = 100
    # A count with no new failure for this long is forgotten.
    forget_failures_after_s: float = 900.0
    # Logins from one host are judged one at a time, so that a flood from one host holds
    # at most one of the max_concurrent_hashes workers; at most this many more wait their
    # turn, and further ones are refused at once.
    logins_waiting_per_host: int = 32


@dataclass(frozen=True)
class TlsSettings:
    """Server certificate and key (PEM files); a client CA turns on mutual TLS."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class KeepaliveSettings:
    """HTTP/2 keepalive: the server pings idle connections to find dead peers, and
    answers clients that ping more often than allowed with GOAWAY (too_many_pings)."""

    time_ms: int = 60_000
    timeout_ms: int = 20_000
    min_client_ping_interval_ms: int = 10_000
    max_ping_strikes: int = 2


@dataclass(frozen=True)
class ServerConfig:
    """What `qm-server` runs with; the command line fills it."""

    data_dir: Path = Path("qm-data")
    listen: str = "127.0.0.1:50051"
    session_ttl_s: float = 30.0
    grace_s: float = 5.0
    # Largest request the transport accepts; larger ones fail with gRPC RESOURCE_EXHAUSTED
    # before the service sees them.
    max_request_bytes: int = 8 * MIB
    max_concurrent_rpcs: int | None = None
    # HTTP/2 streams (calls in progress) per connection. Bounds what one client that
    # never reads its answers can make the server hold (about 5 answers' worth each).
    # Off by default: measured with grpcio 1.85, a limit of 100 already refused a
    # grpc.aio client's calls (REFUSED_STREAM, seen as UNAVAILABLE) at 64 in flight.
    max_streams_per_connection: int | None = None
    admin_password: str | None = None
    # "full" (fsync before every OK) or "process-crash" (see store/sqlite.py); never
    # weaker by default.
    durability: str = "full"
    tls: TlsSettings = field(default_factory=TlsSettings)
    # Plaintext is allowed on loopback addresses only, unless this is set.
    allow_plaintext: bool = False
    keepalive: KeepaliveSettings = field(default_factory=KeepaliveSettings)
    limits: Limits = field(default_factory=Limits)
    auth: AuthSettings = field(default_factory=AuthSettings)
