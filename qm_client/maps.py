"""A server map as a ``MutableMapping``.

Each operation is one or more calls to the server, so the view keeps no cache: what it
returns is what the server holds at that moment. Where a ``Mapping`` operation would be
dishonest over the wire it is replaced: iteration pages (``MapGetList`` by key cursor)
instead of fetching a key at a time, ``update`` is one atomic ``MapBatchPut``, ``clear``
deletes key by key (the map itself stays). The read-modify-write helpers inherited from
``MutableMapping`` (``pop``, ``setdefault``, ``popitem``) are two calls and not atomic.

A missing *map* is not an empty mapping: reads raise :class:`MapNotFound`, because the
server distinguishes them (``MapDestroy`` vs. removing every key). A missing *key* raises
:class:`KeyNotFound`, which is a ``KeyError``, so ``get``, ``in`` and ``pop(k, default)``
work as for a dict.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, MutableMapping, ValuesView
from typing import Any

import qm_client._ops as ops

from ._session import Session
from .errors import KeyNotFound, MapNotFound

__all__ = ["QMap"]


class QMap(MutableMapping[str, str]):
    """A live view of the server map ``name``; create it with ``client.map(name)``.

    ``len()`` and iteration page through the map (``page_size`` entries per call) by key
    cursor, so they cost a call per page. A map changed while it is paged shows every key
    present throughout exactly once (keys added or removed meanwhile may or may not be
    seen). For one consistent snapshot use :meth:`to_dict`.
    """

    def __init__(self, session: Session, name: str, *, page_size: int = 500) -> None:
        self._session = session
        self.name = name
        self.page_size = page_size

    def __repr__(self) -> str:
        return f"QMap({self.name!r})"

    # -- the MutableMapping primitives ----------------------------------------------------

    def __getitem__(self, key: str) -> str:
        return self._session.run(ops.map_get(self.name, key))

    def __setitem__(self, key: str, value: str) -> None:
        self._session.run(ops.map_put(self.name, key, value))

    def __delitem__(self, key: str) -> None:
        self._session.run(ops.map_remove(self.name, key))

    def __iter__(self) -> Iterator[str]:
        for key, _ in self._entries():
            yield key

    def __len__(self) -> int:
        return sum(1 for _ in self._entries())

    # -- replaced for honesty over the wire ----------------------------------------------

    def items(self) -> ItemsView[str, str]:
        """Entries in key order, a page per call (not a key per call)."""
        return _PagedItems(self)

    def values(self) -> ValuesView[str]:
        """Values in key order, a page per call."""
        return _PagedValues(self)

    def update(self, other: Any = (), /, **kwargs: str) -> None:
        """Set many keys in one atomic call (``MapBatchPut``): all of them or none.

        Accepts what ``dict.update`` accepts. Nothing to set makes no call (the server
        refuses an empty batch; Python's ``update`` of nothing is a no-op). The server's
        batch limit (1000 pairs by default) applies: a larger update raises
        :class:`InvalidArgument` rather than being split, which would lose atomicity.
        """
        self._session.run(ops.map_put_all(self.name, dict(other, **kwargs)))

    def clear(self) -> None:
        """Remove every key, one call each; the map itself remains. Not atomic.

        Pages by key cursor while it removes (a page at a time in memory, so a map too big
        for one MapGetAll is cleared too): removing keys does not move the cursor, as it
        would move an offset.
        """
        for key in self:
            try:
                del self[key]
            except KeyNotFound:
                continue  # removed by someone else meanwhile: the goal holds

    # -- beyond Mapping -------------------------------------------------------------------

    def to_dict(self) -> dict[str, str]:
        """The whole map in one call (``MapGetAll``): a consistent snapshot."""
        return self._session.run(ops.map_get_all(self.name))

    def page(self, offset: int = 0, size: int | None = None) -> list[tuple[str, str]]:
        """One page of entries in key order by offset (``MapGetList``); ``[]`` past the end.

        Offsets shift when keys are added or removed; :meth:`page_after` does not."""
        return self._session.run(
            ops.map_page(self.name, offset, self.page_size if size is None else size)
        )

    def page_after(
        self, key: str | None = None, size: int | None = None
    ) -> tuple[list[tuple[str, str]], str | None]:
        """One page of entries in key order after ``key`` (``None``: from the first key),
        and the key to pass for the next page (``None`` once no entry follows).

        Stable while the map changes: no entry present throughout is skipped or repeated.
        """
        return self._session.run(
            ops.map_page_after(self.name, key, self.page_size if size is None else size)
        )

    def exists(self) -> bool:
        """Whether the map exists (it may exist and be empty)."""
        try:
            self.page(0, 1)
        except MapNotFound:
            return False
        return True

    def destroy(self) -> None:
        """Delete the map and its entries (``MapDestroy``); :class:`MapNotFound` if absent."""
        self._session.run(ops.map_destroy(self.name))

    def _entries(self) -> Iterator[tuple[str, str]]:
        return self._session.pages(ops.map_entries(self.name, self.page_size))


class _PagedItems(ItemsView[str, str]):
    _mapping: QMap

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return self._mapping._entries()

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        key, value = item
        try:
            return bool(self._mapping[key] == value)
        except KeyError:
            return False


class _PagedValues(ValuesView[str]):
    _mapping: QMap

    def __iter__(self) -> Iterator[str]:
        for _, value in self._mapping._entries():
            yield value
