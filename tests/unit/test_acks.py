"""Coalesced acks: which frames reach the channel, and that none covers an unfinished delivery."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from contracts.wire import WireClosed
from workers.consumer.acks import AckBatcher


class _RecordingChannel:
    """Records the ack frames queued on it; ``write()`` is the connection's write of a turn."""

    def __init__(self, *, fail: bool = False) -> None:
        self.frames: list[tuple[int, bool]] = []
        self._fail = fail
        self._before_write: list[Callable[[], None]] = []

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        if self._fail:
            raise WireClosed("closed")
        self.frames.append((delivery_tag, multiple))

    def before_flush(self, callback: Callable[[], None]) -> None:
        self._before_write.append(callback)

    def write(self) -> None:
        callbacks, self._before_write = self._before_write, []
        for callback in callbacks:
            callback()


def _acked_by(frames: list[tuple[int, bool]], delivered: set[int]) -> set[int]:
    """What the broker would ack for these frames: ``multiple`` covers every tag up to it."""
    acked: set[int] = set()
    for tag, multiple in frames:
        acked |= {t for t in delivered if t <= tag} if multiple else {tag}
    return acked


def _batcher(channel: _RecordingChannel, tags: range) -> AckBatcher:
    batcher = AckBatcher(channel)  # type: ignore[arg-type]
    for tag in tags:
        batcher.delivered(tag)
    return batcher


def test_requests_finishing_together_are_acked_with_one_frame() -> None:
    channel = _RecordingChannel()
    batcher = _batcher(channel, range(1, 21))
    for tag in range(1, 21):
        batcher.ack(tag)
    channel.write()
    assert channel.frames == [(20, True)]
    assert (batcher.frames, batcher.acked) == (1, 20)


def test_a_delivery_still_being_served_is_never_covered() -> None:
    channel = _RecordingChannel()
    batcher = _batcher(channel, range(1, 11))
    finished = {1, 2, 3, 5, 6, 9}  # 4, 7, 8 and 10 are still being served
    for tag in sorted(finished):
        batcher.ack(tag)
    channel.write()
    assert _acked_by(channel.frames, set(range(1, 11))) == finished
    # The run below the first gap is one frame; the finished ones above it go out at once.
    assert channel.frames == [(3, True), (5, False), (6, False), (9, False)]
    for tag in (4, 7, 8, 10):
        batcher.ack(tag)
    channel.write()
    assert _acked_by(channel.frames, set(range(1, 11))) == set(range(1, 11))


def test_a_rejected_delivery_does_not_hold_back_the_run() -> None:
    channel = _RecordingChannel()
    batcher = _batcher(channel, range(1, 6))
    batcher.rejected(3)  # its reject frame went out first: the broker no longer holds it
    for tag in (1, 2, 4, 5):
        batcher.ack(tag)
    channel.write()
    assert channel.frames == [(5, True)]


def test_an_abandoned_delivery_is_never_acked() -> None:
    channel = _RecordingChannel()
    batcher = _batcher(channel, range(1, 5))
    # 2 is left unsettled on purpose (the worker stops mid-outage): never acked.
    for tag in (1, 3, 4):
        batcher.ack(tag)
    channel.write()
    assert 2 not in _acked_by(channel.frames, set(range(1, 5)))
    assert _acked_by(channel.frames, set(range(1, 5))) == {1, 3, 4}


def test_acks_requested_in_later_turns_are_sent_too() -> None:
    channel = _RecordingChannel()
    batcher = _batcher(channel, range(1, 4))
    batcher.ack(1)
    channel.write()
    batcher.ack(2)
    batcher.ack(3)
    channel.write()
    assert channel.frames == [(1, False), (3, True)]


def test_an_unknown_tag_is_refused() -> None:
    batcher = _batcher(_RecordingChannel(), range(1, 3))
    with pytest.raises(ValueError, match="not awaiting an ack"):
        batcher.ack(7)


def test_a_closed_channel_leaves_the_deliveries_for_redelivery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel = _RecordingChannel(fail=True)
    batcher = _batcher(channel, range(1, 3))
    batcher.ack(1)
    batcher.ack(2)
    channel.write()
    assert (batcher.frames, batcher.acked) == (0, 0)
    assert "left for redelivery" in caplog.text


def test_flush_hands_the_acks_over_at_once_and_only_once() -> None:
    channel = _RecordingChannel()
    batcher = _batcher(channel, range(1, 4))
    for tag in (1, 2, 3):
        batcher.ack(tag)
    batcher.flush()  # the runtime does this before it closes the connection
    assert channel.frames == [(3, True)]
    channel.write()  # the callback registered for the turn's write finds nothing left
    assert channel.frames == [(3, True)]
