"""Who may do what: grants of actions on queue and map name patterns.

`read` covers Poll, PullElements, Subscribe, Size, IsEmpty, GetUncheckNum, GetQueueInfo,
ListDeadLetters (on the dead-letter queue) and map reads; ListQueues and ListMaps need no
grant but list only the names the caller may `read`. `write` covers Add, AddAll, MapPut,
MapBatchPut and MapRemove; naming a queue as a dead_letter_queue (NewQueue, UpdateQueue)
needs `write` on it, and Redrive needs `write` on each original queue it moves a message
back to (one it may not write stays). `manage` covers NewQueue, DestroyQueue, UpdateQueue,
Purge, Redrive (on the dead-letter queue) and MapDestroy. Ack, BatchAck and ExtendLease
need no grant of their own: only the session that received a message (which needed
`read`) can ack it or move its lease. Admins hold everything and manage users; a new user
holds nothing until granted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

ACTIONS = ("read", "write", "manage")
KINDS = ("queue", "map")


@dataclass(frozen=True, slots=True)
class Grant:
    """`action` on every `kind` whose name matches the glob `pattern` (`*`, `jobs.*`)."""

    action: str
    kind: str
    pattern: str

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {self.action!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not self.pattern:
            raise ValueError("the name pattern is empty")

    def __str__(self) -> str:
        return f"{self.action} {self.kind} {self.pattern}"


@dataclass(frozen=True, slots=True)
class Permissions:
    is_admin: bool = False
    grants: tuple[Grant, ...] = field(default_factory=tuple)
    credential: str = field(default="", repr=False)
    """The user's password hash, salted afresh by every `user passwd` and `user add`: a
    session opened with another credential was opened before a password change or by a
    user of the same name since removed, and must end."""

    def allows(self, action: str, kind: str, name: str) -> bool:
        return self.is_admin or any(
            g.action == action and g.kind == kind and fnmatchcase(name, g.pattern)
            for g in self.grants
        )
