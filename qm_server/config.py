"""Server configuration: every limit in one place, each with the default the contract names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qm_server.answer_size import (
    ACK_RESULT_BYTES,
    element_info_size,
    entries_room,
    key_value_size,
)

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
    # The largest answer the server sends, encoded and framed: gRPC's default receive
    # limit, so that a client with default settings receives every answer. PullElements,
    # Subscribe pushes and MapGetList pages stop adding entries before it (the first entry
    # always comes, and always fits: see __post_init__); MapGetAll answers
    # RESOURCE_EXHAUSTED past it (page with MapGetList instead). Raising it needs every
    # client to raise its receive limit as well.
    max_response_bytes: int = 4 * MIB
    # Map reads (MapGet, MapGetList, MapGetAll) being read and built at once may hold
    # this many bytes of answers, each counted at its largest possible size; further
    # reads wait their turn, so that many concurrent big reads cannot grow the server
    # without bound.
    max_reads_in_progress_bytes: int = 32 * MIB

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
    tls: TlsSettings = field(default_factory=TlsSettings)
    # Plaintext is allowed on loopback addresses only, unless this is set.
    allow_plaintext: bool = False
    keepalive: KeepaliveSettings = field(default_factory=KeepaliveSettings)
    limits: Limits = field(default_factory=Limits)
    auth: AuthSettings = field(default_factory=AuthSettings)
