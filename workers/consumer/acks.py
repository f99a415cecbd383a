"""Acks for one channel, coalesced: one ``basic.ack multiple`` for a run of finished requests.

A request is acked once its reply has been handed to the connection (see
``workers/consumer/runtime.py``). Requests that finish in the same turn of the event loop — a group
commit of the audit log releases dozens at once — are acked with one frame, written just after
their replies in the connection's one write of that turn: ``basic.ack`` with ``multiple=True``
and the highest tag of a run acks every delivery up to it. That is one frame for the worker to
write and, on a quorum queue, one settle command for the broker's Raft log instead of dozens.

A run never reaches past a delivery that is still being served, nor past one the worker leaves
unsettled on purpose (abandoned for redelivery): ``multiple`` would ack it too. Finished
requests above such a gap are acked one by one at once, so a slow request never holds back
the acks of those behind it (their unacked count would stall the consumer at its prefetch).

Every tag below a finished one is known here: the runtime registers each delivery's tag as it
arrives, before its request starts, so a request that finished was registered after every
delivery before it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("zandd.runtime")


class AckSink(Protocol):
    """Where ack frames go: the connection that delivered the requests (``contracts/wire.py``)."""

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        """Queue a ``basic.ack`` frame."""

    def before_flush(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, just before the connection writes this turn's frames."""


class AckBatcher:
    """Coalesces the acks of one channel; tags belong to that channel alone."""

    def __init__(self, sink: AckSink) -> None:
        self._sink = sink
        self._unsettled: set[int] = set()
        self._finished: set[int] = set()
        self._scheduled = False
        #: Ack frames sent, and the deliveries they acked.
        self.frames = 0
        self.acked = 0

    def delivered(self, tag: int) -> None:
        """A delivery arrived: it is unsettled until acked or rejected."""
        self._unsettled.add(tag)

    def rejected(self, tag: int) -> None:
        """The delivery was rejected (its frame already queued): no ack may cover it."""
        self._unsettled.discard(tag)

    def ack(self, tag: int) -> None:
        """Ack ``tag`` with whatever else finishes in this turn of the event loop."""
        if tag not in self._unsettled:
            raise ValueError(f"delivery tag {tag} is not awaiting an ack")
        self._finished.add(tag)
        if not self._scheduled:
            self._scheduled = True
            self._sink.before_flush(self._send)

    def flush(self) -> None:
        """Hand every requested ack to the connection now (before it closes, say)."""
        self._send()

    def _send(self) -> None:
        if not self._scheduled:
            return
        self._scheduled = False
        finished, self._finished = self._finished, set()
        serving = self._unsettled - finished
        floor = min(serving) if serving else None
        run = sorted(tag for tag in finished if floor is None or tag < floor)
        singles = sorted(finished.difference(run))
        try:
            if run:
                self._sink.ack(run[-1], multiple=len(run) > 1)
                self._sent(run)
            for tag in singles:
                self._sink.ack(tag)
                self._sent([tag])
        except ConnectionError as exc:
            # Unacked deliveries return to the queue with the channel: answered twice at
            # worst, and the client drops the second answer.
            log.warning("%d acks not sent (%s): left for redelivery", len(finished), exc)

    def _sent(self, tags: list[int]) -> None:
        self._unsettled.difference_update(tags)
        self.frames += 1
        self.acked += len(tags)
