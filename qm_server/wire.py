"""Pieces of responses that several handlers build alike."""

from __future__ import annotations

from typing import cast

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from qm.v1 import queue_manager_pb2 as pb
from qm_server import errors
from qm_server.store.base import Delivery


def code_of(exc: errors.QmError) -> pb.Code:
    """The response code that carries an engine error (the contract's codes)."""
    return cast(pb.Code, int(exc.code))


def add_element_info(
    target: RepeatedCompositeFieldContainer[pb.ElementInfo], deliveries: list[Delivery]
) -> None:
    """Append one ElementInfo per delivery to a response's repeated field.

    Built in place with `add()` and attribute stores: a list of ElementInfo passed to a
    response's constructor is copied element by element, which cost twice as much.
    """
    add = target.add
    for d in deliveries:
        info = add()
        info.element = d.element
        info.message_id = d.message_id
        info.delivery_count = d.delivery_count
