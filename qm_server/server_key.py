"""Where the server's RSA key pair comes from: the data directory, or the shared store.

A server on its own store (the embedded SQLite database) keeps its key in its data
directory (auth.KeyPair.load_or_create). Servers sharing a store (PostgreSQL) must show
clients one identity, the same fingerprint whichever node answers, and decrypt what any
node's GetChallenge key encrypted: the key lives in the store (Store.shared_secret),
created once by the first node. That first node stores its data directory's key if it
has one, so a single node moved onto a shared store keeps the fingerprint its clients
pinned; otherwise a new key.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qm_server.auth import KEY_FILE, KeyPair, new_private_pem
from qm_server.store.base import Store

log = logging.getLogger(__name__)

KEY_SECRET = "server-key"


async def load_server_key(store: Store, data_dir: Path, bits: int) -> KeyPair:
    """The key pair this server serves with (the store is open)."""

    def create() -> bytes:
        path = data_dir / KEY_FILE
        if path.exists():
            log.info("the shared store has no server key yet: storing %s's", path)
            return path.read_bytes()
        return new_private_pem(bits)

    shared = await store.shared_secret(KEY_SECRET, create)
    if shared is None:
        return KeyPair.load_or_create(data_dir, bits)
    return KeyPair.from_pem(shared, f"the store's {KEY_SECRET!r}")
