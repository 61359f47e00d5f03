"""Login machinery: the server key pair, one-use challenges, password hashes, tokens.

Nothing here touches gRPC or the store; the engine combines these pieces into the login
rules of the contract.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from qm_server.config import AuthSettings
from qm_server.fsutil import write_private_file

KEY_FILE = "server-key.pem"
ALGORITHM = "RSA-OAEP-SHA256"
CHALLENGE_BYTES = 32
_OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


class KeyPair:
    """The server's RSA key: created once in the data directory (0600), then reused."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self._private_key = private_key
        public = private_key.public_key()
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key_pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        self.fingerprint = hashlib.sha256(der).hexdigest()

    @classmethod
    def load_or_create(cls, data_dir: Path, bits: int) -> KeyPair:
        path = data_dir / KEY_FILE
        if path.exists():
            return cls.from_pem(path.read_bytes(), str(path))
        pem = new_private_pem(bits)
        write_private_file(path, pem)
        return cls.from_pem(pem, str(path))

    @classmethod
    def from_pem(cls, pem: bytes, where: str) -> KeyPair:
        """The key pair of a PEM private key (`where` it came from, for the error)."""
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{where} does not hold an RSA private key")
        return cls(key)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """RSA-OAEP-SHA256 only; raises ValueError on anything that does not decrypt."""
        return self._private_key.decrypt(ciphertext, _OAEP)


def new_private_pem(bits: int) -> bytes:
    """A new RSA private key, PEM (PKCS#8, unencrypted: its file or row is private)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class ChallengeBook:
    """Challenges handed out and not yet used; each is good for one login, then burnt.

    Bounded: when full, the oldest challenge is dropped, so a flood of GetChallenge calls
    costs memory only up to the bound.
    """

    def __init__(self, ttl_s: float, capacity: int, clock: Callable[[], float]) -> None:
        self._ttl_s = ttl_s
        self._capacity = capacity
        self._clock = clock
        self._expiry_by_challenge: OrderedDict[bytes, float] = OrderedDict()

    def issue(self) -> bytes:
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        self._expiry_by_challenge[challenge] = self._clock() + self._ttl_s
        while len(self._expiry_by_challenge) > self._capacity:
            self._expiry_by_challenge.popitem(last=False)
        return challenge

    def burn(self, challenge: bytes) -> bool:
        """True if the challenge was issued, unexpired and unused; it is unusable after."""
        expiry = self._expiry_by_challenge.pop(challenge, None)
        self._drop_expired()
        return expiry is not None and self._clock() < expiry

    def _drop_expired(self) -> None:
        now = self._clock()
        while self._expiry_by_challenge:
            first, expiry = next(iter(self._expiry_by_challenge.items()))
            if expiry > now:
                break
            del self._expiry_by_challenge[first]


@dataclass(frozen=True)
class PasswordHasher:
    """scrypt from the standard library: salted, slow, compared in constant time.

    Stored form: ``scrypt$n$r$p$salt_b64$hash_b64`` so that costs can rise later without
    breaking old hashes.
    """

    n: int
    r: int
    p: int

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> PasswordHasher:
        return cls(settings.scrypt_n, settings.scrypt_r, settings.scrypt_p)

    def hash(self, password: str) -> str:
        salt = secrets.token_bytes(16)
        digest = self._derive(password, salt, self.n, self.r, self.p)
        return "$".join(["scrypt", str(self.n), str(self.r), str(self.p), _b64(salt), _b64(digest)])

    def verify(self, password: str, stored: str | None) -> bool:
        """Always does one full hash, even for an unknown user, so timing leaks nothing."""
        if stored is None:
            self._derive(password, b"\0" * 16, self.n, self.r, self.p)
            return False
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            raise ValueError(f"unknown password scheme {scheme!r}")
        actual = self._derive(password, _unb64(salt), int(n), int(r), int(p))
        return hmac.compare_digest(actual, _unb64(digest))

    @staticmethod
    def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
        return hashlib.scrypt(
            password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=32
        )


@dataclass(slots=True)
class _Failures:
    count: int
    refused_until: float
    last_failure: float
    refusal_logged: bool = False


class LoginThrottle:
    """Counts recent failed logins per key and backs off.

    After `free_failures` failures the key is refused for 1 s, then 2 s, 4 s ... up to
    `max_backoff_s`; a success clears it, and so does a quiet `forget_after_s` with no
    failure (a host that mistyped long ago starts afresh). Bounded: the oldest entries
    are forgotten.
    """

    def __init__(
        self,
        free_failures: int,
        max_backoff_s: float,
        clock: Callable[[], float],
        capacity: int = 100_000,
        forget_after_s: float = 900.0,
    ) -> None:
        self._free_failures = free_failures
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._capacity = capacity
        self._forget_after_s = forget_after_s
        self._state: OrderedDict[str, _Failures] = OrderedDict()

    def retry_after(self, key: str) -> float:
        """Seconds until the key may try again; 0 when it may try now."""
        state = self._recent(key)
        return 0.0 if state is None else max(0.0, state.refused_until - self._clock())

    def failures(self, key: str) -> int:
        """Recent failures of the key (0 once forgotten)."""
        state = self._recent(key)
        return 0 if state is None else state.count

    def failed(self, key: str, free_failures: int | None = None) -> float:
        """Count a failure; returns the backoff it starts, in seconds (0: none).

        `free_failures` overrides the allowance for this failure (a user under attack
        from many hosts gives each host fewer).
        """
        free = self._free_failures if free_failures is None else free_failures
        previous = self._recent(key)
        self._state.pop(key, None)
        now = self._clock()
        failures = 1 if previous is None else previous.count + 1
        backoff = 0.0
        if failures >= free:
            # The exponent is capped: past about 1030 failures 2.0 ** n overflowed, the
            # login answered CODE_INTERNAL and the key's count was lost (free tries again).
            exponent = min(failures - free, 62)
            backoff = min(self._max_backoff_s, 2.0**exponent)
        self._state[key] = _Failures(failures, now + backoff, now)
        while len(self._state) > self._capacity:
            self._state.popitem(last=False)
        return backoff

    def succeeded(self, key: str) -> None:
        self._state.pop(key, None)

    def first_refusal(self, key: str) -> bool:
        """True once per backoff: the refusals that follow are not worth a log line each."""
        state = self._recent(key)
        if state is None or state.refusal_logged:
            return False
        state.refusal_logged = True
        return True

    def _recent(self, key: str) -> _Failures | None:
        state = self._state.get(key)
        if state is not None and self._clock() - state.last_failure > self._forget_after_s:
            del self._state[key]
            return None
        return state


def new_token() -> str:
    """256 random bits, URL-safe; the server keeps only token_digest(token)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def random_password() -> str:
    return secrets.token_urlsafe(18)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)
