"""One Subscribe call: open a Subscription, then push deliveries and apply acks.

Two activities share the stream: pushing deliveries (`Subscription.next_batch`) and
applying the client's acks (`Subscription.ack`). Both feed one outbox that `responses`
drains, so responses go out in order and one failing side ends the whole stream with its
code (or, when the store cannot tell whether a claim or an ack committed, with the gRPC
status UNAVAILABLE: handlers.py; such a claim's messages, never delivered, stay in flight
until their lease runs out or the session ends). Imports no gRPC: it reads requests
already parsed and checked (handlers.checked) and yields responses; the servicer tells it
when the call has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from qm.v1 import queue_manager_pb2 as pb
from qm_server import errors
from qm_server.engine import Engine
from qm_server.subscription import Subscription
from qm_server.wire import add_element_info, add_results, code_of


class SubscribeStream:
    def __init__(self, engine: Engine, requests: AsyncIterator[pb.SubscribeRequest]) -> None:
        self._engine = engine
        self._requests = requests
        # Responses, then None at the end; or the OutcomeUnknown that ends the call.
        self._outbox: asyncio.Queue[pb.SubscribeResponse | errors.OutcomeUnknown | None] = (
            asyncio.Queue()
        )
        self._subscription: Subscription | None = None
        self._tasks: list[asyncio.Future[None]] = []
        self._call_ended = False

    async def responses(self) -> AsyncGenerator[pb.SubscribeResponse, None]:
        """The stream's responses: an error answering the open, or deliveries, ack results
        and, last, the code that ended it."""
        try:
            first = await anext(self._requests)
            if first.WhichOneof("kind") != "open":
                raise errors.InvalidArgument("the first message must be open")
            opening = first.open
            lease_ms = opening.ack_deadline_ms if opening.HasField("ack_deadline_ms") else None
            self._subscription = await self._engine.subscribe(
                opening.token, opening.queue_name, opening.max_unacked, lease_ms
            )
        except StopAsyncIteration:
            return
        except errors.OutcomeUnknown:
            raise  # the call's gRPC status (handlers.py), as the servicer's answers
        except errors.QmError as exc:
            yield pb.SubscribeResponse(code=code_of(exc), message=str(exc))
            return
        subscription = self._subscription
        self._tasks = [
            asyncio.ensure_future(self._guarded(lambda: self._push(subscription))),
            asyncio.ensure_future(self._guarded(lambda: self._apply_acks(subscription))),
        ]
        if self._call_ended:
            self.call_ended()
        try:
            while (response := await self._outbox.get()) is not None:
                if isinstance(response, errors.OutcomeUnknown):
                    raise response
                yield response
        finally:
            await self._stop()

    def call_ended(self) -> None:
        """The call is over, however it ended: stop the stream and release its messages.

        A call cancelled while gRPC is sending leaves `responses` suspended at its yield,
        and its `finally` then runs only when the generator is collected: after a
        reference cycle, whenever the cyclic GC next runs, which on an idle server can be
        never. So the call's own end stops the stream, in the background."""
        self._call_ended = True
        if self._subscription is not None:
            self._engine.in_background(self._stop())

    async def _push(self, subscription: Subscription) -> None:
        while True:
            deliveries = await subscription.next_batch()
            response = pb.SubscribeResponse()
            add_element_info(response.element_info, deliveries)
            await self._outbox.put(response)

    async def _apply_acks(self, subscription: Subscription) -> None:
        async for request in self._requests:
            if request.WhichOneof("kind") != "ack":
                raise errors.InvalidArgument("only ack may follow open")
            ids = list(request.ack.message_ids)
            codes, refill = await subscription.ack(ids, request.ack.ack_type)
            failed = any(codes)  # rare: a consumer acks what its stream no longer holds
            if failed or refill:
                response = pb.SubscribeResponse()
                if failed:  # only the acks that were not OK are echoed
                    outcomes = zip(ids, codes, strict=True)
                    add_results(response.ack_results, (o for o in outcomes if o[1]))
                add_element_info(response.element_info, refill)
                await self._outbox.put(response)
        await self._outbox.put(None)  # the client closed its side: end the stream

    async def _guarded(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run one side; its engine error ends the stream with that error's code."""
        try:
            await work()
        except errors.OutcomeUnknown as exc:
            await self._outbox.put(exc)
        except errors.QmError as exc:
            await self._outbox.put(pb.SubscribeResponse(code=code_of(exc), message=str(exc)))
            await self._outbox.put(None)

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._subscription is not None:
            await self._subscription.close()  # once: a second call returns at once
