"""Login challenges: burnt on first use, bounded in time, and, when servers share a store,
checkable by any of them.

One server keeps the challenges it handed out in memory (auth.ChallengeBook). Servers
sharing a store (PostgreSQL) cannot: GetChallenge may reach one node and Auth another. So
their challenges carry their own proof (SignedChallenges): 32 bytes, as the contract
says, that only a holder of the cluster's challenge key (Store.shared_secret) can make:

    nonce (10 random bytes) | expiry (6 bytes, Unix ms, masked) | MAC (16 bytes)

The MAC is HMAC-SHA256 over nonce and expiry, cut to 16 bytes; the expiry is masked
with bytes derived from the key and the nonce, so to a client the whole challenge looks
as random as before. Issuing one costs no database write (a flood of GetChallenge calls
costs nothing but CPU); using one is one INSERT into the store's used challenges, keyed
by the nonce, which refuses a nonce already there and an expiry already past by the
database's clock (Store.burn_challenge): one use across every node, however many nodes
are asked at once. Used nonces are deleted once expired, so the table holds at most the
logins of one challenge TTL.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import Protocol

from qm_server.auth import CHALLENGE_BYTES, ChallengeBook
from qm_server.store.base import Store

NONCE_BYTES = 10
EXPIRY_BYTES = 6
MAC_BYTES = CHALLENGE_BYTES - NONCE_BYTES - EXPIRY_BYTES
KEY_SECRET = "challenge-key"
KEY_BYTES = 32


class Challenges(Protocol):
    def issue(self) -> bytes:
        """A new challenge, good for one login within the TTL."""

    async def burn(self, challenge: bytes) -> bool:
        """True if the challenge was issued, unexpired and unused; unusable after."""


class MemoryChallenges:
    """One server's challenges (auth.ChallengeBook), behind the Challenges protocol."""

    def __init__(self, book: ChallengeBook) -> None:
        self._book = book

    def issue(self) -> bytes:
        return self._book.issue()

    async def burn(self, challenge: bytes) -> bool:
        return self._book.burn(challenge)


class SignedChallenges:
    """Challenges any server sharing `store` checks (the module says how)."""

    def __init__(
        self, key: bytes, ttl_s: float, store: Store, wall_clock: Callable[[], float]
    ) -> None:
        self._key = key
        self._ttl_ms = int(ttl_s * 1000)
        self._store = store
        self._wall_clock = wall_clock

    def issue(self) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        expiry = int(self._wall_clock() * 1000) + self._ttl_ms
        plain = expiry.to_bytes(EXPIRY_BYTES, "big")
        masked = bytes(a ^ b for a, b in zip(plain, self._mask(nonce), strict=True))
        return nonce + masked + self._mac(nonce, plain)

    async def burn(self, challenge: bytes) -> bool:
        if len(challenge) != CHALLENGE_BYTES:
            return False
        nonce = challenge[:NONCE_BYTES]
        masked = challenge[NONCE_BYTES : NONCE_BYTES + EXPIRY_BYTES]
        plain = bytes(a ^ b for a, b in zip(masked, self._mask(nonce), strict=True))
        if not hmac.compare_digest(challenge[-MAC_BYTES:], self._mac(nonce, plain)):
            return False  # not ours (forged, altered, or another cluster's)
        return await self._store.burn_challenge(nonce, int.from_bytes(plain, "big"))

    def _mac(self, nonce: bytes, plain_expiry: bytes) -> bytes:
        return hmac.new(self._key, b"mac" + nonce + plain_expiry, hashlib.sha256).digest()[
            :MAC_BYTES
        ]

    def _mask(self, nonce: bytes) -> bytes:
        return hmac.new(self._key, b"mask" + nonce, hashlib.sha256).digest()[:EXPIRY_BYTES]


async def shared_challenges(
    store: Store, ttl_s: float, wall_clock: Callable[[], float]
) -> Challenges | None:
    """SignedChallenges when `store` is shared by several servers; None for a store of
    one server's own (the engine then keeps its challenges in memory)."""
    key = await store.shared_secret(KEY_SECRET, lambda: secrets.token_bytes(KEY_BYTES))
    if key is None:
        return None
    return SignedChallenges(key, ttl_s, store, wall_clock)
