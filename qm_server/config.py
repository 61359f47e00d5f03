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
    # After this many consecutive failures for one user or one peer, logins from it are
    # refused (RESOURCE_EXHAUSTED) for a backoff that doubles with each further failure.
    failures_before_backoff: int = 5
    max_backoff_s: float = 60.0


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
    # How long the integrity check at start (PRAGMA quick_check) may take before it is
    # abandoned with a warning; 0 skips it. `qm-server check` runs the full check.
    start_check_s: float = 10.0
    # Start with a new, empty database in a directory whose key shows that it held one
    # (datadir.py): without it, such a directory is refused.
    new_database: bool = False
    # Disk space set aside so that a full disk can still be drained (store/reserve.py);
    # as large as the write-ahead log the store keeps at most. 0: none.
    disk_reserve_bytes: int = 64 * MIB
    tls: TlsSettings = field(default_factory=TlsSettings)
    # Plaintext is allowed on loopback addresses only, unless this is set.
    allow_plaintext: bool = False
    keepalive: KeepaliveSettings = field(default_factory=KeepaliveSettings)
    limits: Limits = field(default_factory=Limits)
    auth: AuthSettings = field(default_factory=AuthSettings)
