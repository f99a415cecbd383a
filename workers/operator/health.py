"""``zandd health``: is this worker's world in order? For orchestrators' health checks.

Checked in order, stopping at the first failure (which :class:`Unhealthy` names in one line):

1. the broker accepts our connection and takes a message: a probe published (with a
   publisher confirm) to the default exchange, routed to no queue, so the broker drops it.
   A broker in a memory or disk alarm blocks every publisher — workers' replies and
   producers' requests alike — and tells a connection so only once it publishes: the probe is
   how a fresh process learns of the alarm (``connection.blocked``), and health fails naming
   it;
2. the role's queue has at least one consumer (both queues without ``--role``). A fresh
   process cannot know the consumer tag of the worker it checks on, so this asks the broker
   for the queue's consumer count (a passive declare, which needs no permission). On
   ``zandd.keygen`` (single active consumer) the count is the active consumer only: a standby
   keygen worker passes when the active one is attached;
3. the vault answers a lookup, and every KEK its records name is in the KEK ring (a wrong
   ring, or none, leaves those records unreadable);
4. for ``keygen``: the TPM answered the keygen worker recently. The worker owns the TPM, so
   health does not open a TPM connection of its own (``device:/dev/tpm0`` admits one user;
   a fresh connection would not tell whether the *worker's* context still works after a TPM
   reset). Instead the worker runs :class:`TpmHeartbeat`, which asks its own TPM for its
   properties every ``HEARTBEAT_INTERVAL_S`` and writes the result to ``keygen-tpm.json`` in
   the data dir; health requires a successful check younger than ``HEARTBEAT_MAX_AGE_S``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from contracts.amqp import connect
from contracts.errors import ZanddError
from contracts.topology import KEYGEN_QUEUE, SIGN_QUEUE, consumer_count
from contracts.urls import redact_url
from contracts.wire import Properties, Wire, WireClosed
from vault.coverage import coverage_of, no_ring_error, unreadable_error
from vault.kek import ring_file_kek_ids
from vault.store import open_store
from workers.service.config import Settings

CHECK_TIMEOUT_S = 5.0
HEARTBEAT_INTERVAL_S = 10.0
HEARTBEAT_MAX_AGE_S = 3 * HEARTBEAT_INTERVAL_S
HEARTBEAT_FILE = "keygen-tpm.json"
_PROBE_REQUEST_ID = "zandd-health-probe"
#: Where the publishing probe goes: the default exchange, no queue of that name (dropped).
PROBE_ROUTING_KEY = "zandd.health.probe"


class Role(StrEnum):
    """A worker role ``zandd health --role`` can check."""

    KEYGEN = "keygen"
    SIGNER = "signer"


ROLE_QUEUES: dict[Role, str] = {Role.KEYGEN: KEYGEN_QUEUE, Role.SIGNER: SIGN_QUEUE}


class Unhealthy(ZanddError):
    """A health check failed; the message says which one and why."""


@dataclass(frozen=True, slots=True)
class HealthReport:
    """What passed, for the one line ``zandd health`` prints."""

    passed: tuple[str, ...]

    @property
    def line(self) -> str:
        """``healthy: broker, zandd.sign (2 consumers), vault``."""
        return "healthy: " + ", ".join(self.passed)


@dataclass(frozen=True, slots=True)
class TpmCheck:
    """One TPM check by the keygen worker, as written to the heartbeat file."""

    ok: bool
    checked_at: float
    detail: str

    def to_json(self) -> str:
        """The heartbeat file's content."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TpmCheck:
        """Parse a heartbeat file; ValueError when it is not one."""
        try:
            data = json.loads(text)
            return cls(
                ok=bool(data["ok"]),
                checked_at=float(data["checked_at"]),
                detail=str(data["detail"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a TPM heartbeat: {exc}") from exc


def heartbeat_path(settings: Settings) -> Path:
    """Where the keygen worker of this data dir writes its TPM heartbeat."""
    return settings.data_dir / HEARTBEAT_FILE


class TpmHeartbeat:
    """The keygen worker's periodic TPM check, written where ``zandd health`` reads it.

    ``probe`` must run a cheap TPM command through the worker's own TPM connection (on the
    thread that owns it) and raise a ``ZanddError`` when the TPM does not answer.
    """

    def __init__(
        self,
        path: Path,
        probe: Callable[[], Awaitable[object]],
        *,
        interval_s: float = HEARTBEAT_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._probe = probe
        self._interval_s = interval_s
        self._clock = clock

    async def beat(self) -> TpmCheck:
        """Probe the TPM once and record the result."""
        try:
            await self._probe()
        except ZanddError as exc:
            check = TpmCheck(ok=False, checked_at=self._clock(), detail=exc.message)
        else:
            check = TpmCheck(ok=True, checked_at=self._clock(), detail="answered")
        _write_atomically(self._path, check.to_json())
        return check

    async def run(self, stop: asyncio.Event) -> None:
        """Beat every interval until ``stop`` is set, then remove the file (a stopped worker
        vouches for nothing)."""
        try:
            while not stop.is_set():
                await self.beat()
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._interval_s)
        finally:
            self._path.unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def read_tpm_check(path: Path, *, now: float, max_age_s: float = HEARTBEAT_MAX_AGE_S) -> str:
    """A description of the last good TPM check at ``path``; ``Unhealthy`` when there is none."""
    try:
        check = TpmCheck.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Unhealthy(
            f"no TPM heartbeat at {path}: is a keygen worker running with this data dir?"
        ) from None
    except (OSError, ValueError) as exc:
        raise Unhealthy(f"cannot read the TPM heartbeat {path}: {exc}") from exc
    age_s = max(0.0, now - check.checked_at)
    if not check.ok:
        raise Unhealthy(f"the TPM did not answer the keygen worker: {check.detail}")
    if age_s > max_age_s:
        raise Unhealthy(
            f"the keygen worker last checked the TPM {age_s:.0f} s ago (limit {max_age_s:.0f} s)"
        )
    return f"TPM (answered {age_s:.0f} s ago)"


async def check_health(
    settings: Settings, role: Role | None, *, now: Callable[[], float] = time.time
) -> HealthReport:
    """Run the checks for ``role`` (the whole fleet's queues when None).

    Raises:
        Unhealthy: the first check that failed.
    """
    passed = ["broker"]
    try:
        connection = await connect(
            settings.amqp_url, connection_name="zandd-health", timeout_s=CHECK_TIMEOUT_S
        )
    except ZanddError as exc:
        raise Unhealthy(exc.message) from exc
    try:
        await check_publishing(settings.amqp_url)
        queues = [ROLE_QUEUES[role]] if role is not None else list(ROLE_QUEUES.values())
        for queue in queues:
            consumers = await _consumer_count(connection, queue)
            passed.append(f"{queue} ({consumers} consumer{'s' if consumers != 1 else ''})")
    finally:
        await connection.close()
    await _check_vault(settings.resolved_vault_url, settings.resolved_kek_file)
    passed.append("vault")
    if role is Role.KEYGEN:
        passed.append(read_tpm_check(heartbeat_path(settings), now=now()))
    return HealthReport(tuple(passed))


async def check_publishing(url: str, *, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Publish a probe the broker drops; ``Unhealthy`` when it is refused or blocked.

    A connection of its own (the lean one, which hears ``connection.blocked``): closed
    politely, or dropped when blocked (a blocked connection's close would not be read).
    """
    try:
        wire = await Wire.connect(url, connection_name="zandd-health", timeout_s=timeout_s)
    except ZanddError as exc:
        raise Unhealthy(exc.message) from exc
    blocked: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def heard(reason: str | None) -> None:
        if reason is not None and not blocked.done():
            blocked.set_result(reason)

    wire.on_blocked(heard)
    try:
        await wire.confirm_select()
        confirmed = wire.publish(b"", Properties(), routing_key=PROBE_ROUTING_KEY)
        assert confirmed is not None  # confirms are on
        waits: set[asyncio.Future[Any]] = {confirmed, blocked}
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except WireClosed as exc:
        raise Unhealthy(f"the broker did not take a probe message: {exc}") from exc
    finally:
        if wire.blocked:
            wire.drop("health check done")
        else:
            await wire.close()
    if blocked.done():
        raise Unhealthy(
            f"the broker is refusing new messages ({blocked.result()}: a memory or disk alarm "
            "on the broker); workers start no new request and callers get BrokerBlocked "
            "until it clears"
        )
    if not confirmed.done():
        raise Unhealthy(f"the broker did not confirm a probe message within {timeout_s:.0f} s")
    failure = confirmed.exception()
    if failure is not None:
        raise Unhealthy(f"the broker did not take a probe message: {failure}")
    if not confirmed.result():
        raise Unhealthy("the broker refused a probe message (a publisher nack)")


async def _consumer_count(connection: AbstractRobustConnection, queue: str) -> int:
    try:
        consumers = await consumer_count(connection, queue, timeout_s=CHECK_TIMEOUT_S)
    except ZanddError as exc:
        raise Unhealthy(exc.message) from exc
    if consumers < 1:
        raise Unhealthy(f"no consumer on {queue}")
    return consumers


async def _check_vault(url: str, ring_path: Path) -> None:
    where = redact_url(url)
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            store = await open_store(url)
            try:
                await store.find_by_request_id(_PROBE_REQUEST_ID, owner=_PROBE_REQUEST_ID)
                usage = await store.kek_usage()
            finally:
                await store.close()
    except TimeoutError:
        raise Unhealthy(
            f"the vault at {where} did not answer within {CHECK_TIMEOUT_S:.0f} s"
        ) from None
    except ZanddError as exc:
        raise Unhealthy(f"the vault at {where} failed: {exc.message}") from exc
    except OSError as exc:
        raise Unhealthy(f"the vault at {where} failed: {exc.strerror or exc}") from exc
    _check_ring(usage, ring_path, url)


def _check_ring(usage: dict[str, int], ring_path: Path, url: str) -> None:
    """Every KEK the vault's records name must be in the ring (its ids need no unsealing)."""
    try:
        kek_ids = ring_file_kek_ids(ring_path)
    except ZanddError as exc:
        raise Unhealthy(exc.message) from exc
    coverage = coverage_of(usage, kek_ids or ())
    if coverage.complete:
        return
    if kek_ids is None:
        raise Unhealthy(no_ring_error(coverage, ring_path, url).message)
    raise Unhealthy(unreadable_error(coverage, ring_path, url).message)
