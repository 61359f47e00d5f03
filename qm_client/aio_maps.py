"""A server map for the asyncio client.

The same operations as :class:`QMap` (``_ops.py`` builds them for both), awaited; a
``MutableMapping`` cannot be awaited, so the dict-like names are methods: ``get``,
``put``, ``remove``, ``put_all`` (one atomic ``MapBatchPut``), ``get_all`` (one
consistent snapshot), ``page`` and ``page_after``; ``async for key in amap`` and
:meth:`AsyncQMap.items` page by key cursor. A missing map raises :class:`MapNotFound`,
a missing key :class:`KeyNotFound`, as for ``QMap``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TypeVar, overload

import qm_client._ops as ops

from ._aio_session import AsyncSession
from .errors import KeyNotFound, MapNotFound

__all__ = ["AsyncQMap"]

_RAISE = object()
_T = TypeVar("_T")


class AsyncQMap:
    """A live view of the server map ``name``; create it with ``client.map(name)``.

    No cache: each method is one or more calls, and returns what the server holds then.
    Iteration shows every key present throughout exactly once, as for ``QMap``.
    """

    def __init__(self, session: AsyncSession, name: str, *, page_size: int = 500) -> None:
        self._session = session
        self.name = name
        self.page_size = page_size

    def __repr__(self) -> str:
        return f"AsyncQMap({self.name!r})"

    @overload
    async def get(self, key: str) -> str: ...

    @overload
    async def get(self, key: str, default: _T) -> str | _T: ...

    async def get(self, key: str, default: object = _RAISE) -> object:
        """The value of ``key``; ``default`` if it is absent and one is given, else
        :class:`KeyNotFound`."""
        try:
            return await self._session.run(ops.map_get(self.name, key))
        except KeyNotFound:
            if default is _RAISE:
                raise
            return default

    async def put(self, key: str, value: str) -> None:
        await self._session.run(ops.map_put(self.name, key, value))

    async def remove(self, key: str) -> None:
        """Remove ``key``; :class:`KeyNotFound` if absent."""
        await self._session.run(ops.map_remove(self.name, key))

    async def put_all(self, pairs: Mapping[str, str]) -> None:
        """Set many keys in one atomic call: all of them or none (``QMap.update``)."""
        await self._session.run(ops.map_put_all(self.name, dict(pairs)))

    async def get_all(self) -> dict[str, str]:
        """The whole map in one call (``MapGetAll``): a consistent snapshot."""
        return await self._session.run(ops.map_get_all(self.name))

    async def page(self, offset: int = 0, size: int | None = None) -> list[tuple[str, str]]:
        """One page of entries in key order by offset; ``[]`` past the end."""
        size = self.page_size if size is None else size
        return await self._session.run(ops.map_page(self.name, offset, size))

    async def page_after(
        self, key: str | None = None, size: int | None = None
    ) -> tuple[list[tuple[str, str]], str | None]:
        """One page of entries after ``key`` and the key for the next page (``None`` at
        the end); stable while the map changes (``QMap.page_after``)."""
        size = self.page_size if size is None else size
        return await self._session.run(ops.map_page_after(self.name, key, size))

    def items(self) -> AsyncIterator[tuple[str, str]]:
        """Entries in key order, a page per call."""
        return self._session.pages(ops.map_entries(self.name, self.page_size))

    async def __aiter__(self) -> AsyncIterator[str]:
        async for key, _ in self.items():
            yield key

    async def size(self) -> int:
        """How many keys, counted page by page."""
        return sum([1 async for _ in self.items()])

    async def contains(self, key: str) -> bool:
        return await self.get(key, None) is not None

    async def exists(self) -> bool:
        """Whether the map exists (it may exist and be empty)."""
        try:
            await self.page(0, 1)
        except MapNotFound:
            return False
        return True

    async def clear(self) -> None:
        """Remove every key, one call each; the map itself remains. Not atomic."""
        async for key in self:
            try:
                await self.remove(key)
            except KeyNotFound:
                continue  # removed by someone else meanwhile: the goal holds

    async def destroy(self) -> None:
        """Delete the map and its entries; :class:`MapNotFound` if absent."""
        await self._session.run(ops.map_destroy(self.name))
