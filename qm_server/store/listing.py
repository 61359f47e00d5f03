"""Names a caller may see, paged by name: the one loop both stores list maps with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

# Names read at a time while looking for visible ones.
NAMES_CHUNK = 256


async def visible_names(
    names_after: Callable[[str, int], Awaitable[list[str]]],
    start_after: str,
    limit: int,
    visible: Callable[[str], bool],
) -> list[str]:
    """Up to `limit` names after `start_after` for which `visible` holds, in the order
    `names_after(cursor, count)` reads them, a chunk at a time. The filter runs here, on
    the event loop, where `visible` may read the caller's grants; invisible names do not
    count toward the limit, so a page is short only at the end."""
    found: list[str] = []
    cursor = start_after
    while len(found) < limit:
        names = await names_after(cursor, NAMES_CHUNK)
        for name in names:
            if visible(name):
                found.append(name)
                if len(found) == limit:
                    break
        if len(names) < NAMES_CHUNK:
            break
        cursor = names[-1]
    return found
