"""The scenarios through the broker: ``echo``, ``sign``, ``batch`` and ``keygen``.

``sign``, ``batch`` and ``keygen`` go through :class:`contracts.client.SigningClient`, the
client code users run; ``echo`` through the plain reference in :mod:`workers.bench.echo`, with
as many echo consumer processes as the fleet has signers, so process stands beside process.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

from aio_pika.exceptions import AMQPError

from contracts.amqp import connect
from contracts.client import SigningClient
from contracts.errors import ZanddError
from contracts.models import SignRequest
from workers.bench.cpu import CpuMeter
from workers.bench.echo import READY_LINE, EchoClient, echo_queue_arguments
from workers.bench.many_keys import KeySet, key_set, random_key
from workers.bench.measure import (
    MIN_OPERATIONS,
    Load,
    Operation,
    Run,
    Timing,
    drive,
    interleaved,
    measured,
)
from workers.bench.progress import Progress

#: Requests in flight for ``echo`` and ``sign`` (the issue's figure).
CONCURRENCY = 64
ITEMS_PER_MESSAGE = 100
#: Alternating slices per compared pair (``echo``/``sign``, ``echo_serial``/``sign_serial``).
SLICES = 6
#: ``sign.batch`` messages in flight: enough to keep every signer busy while replies travel.
BATCH_IN_FLIGHT = 16
_ECHO_READY_TIMEOUT_S = 30.0
_ECHO_STOP_TIMEOUT_S = 10.0
_BENCH_LABEL = "zandd-bench"


@dataclass(frozen=True, slots=True)
class Round:
    """One repeat of the compared pairs (issue 19): each ratio is judged on its median."""

    echo: Run
    sign: Run
    echo_serial: Run
    sign_serial: Run
    sign_many_keys: Run | None = None


@dataclass(frozen=True, slots=True)
class FleetResults:
    """What one fleet size measured through the broker (``keygen`` is measured once apart).

    ``echo``, ``sign``, ``echo_serial``, ``sign_serial`` and ``sign_many_keys`` hold every
    repeat's slices merged; ``rounds`` each repeat apart (empty: one round, the merged runs).
    """

    signers: int
    echo: Run
    echo_serial: Run
    sign: Run
    sign_serial: Run
    batch: Run
    #: issue 15: ``sign`` with a random key of many, interleaved with ``echo`` and ``sign``
    #: (the first fleet size only; None when not measured).
    sign_many_keys: Run | None = None
    key_set: KeySet | None = None
    #: issue 19: each repeat of the compared pairs (``--repeat``).
    rounds: tuple[Round, ...] = ()

    def each_round(self) -> tuple[Round, ...]:
        """The repeats, or the merged runs as the one round when there is no list."""
        if self.rounds:
            return self.rounds
        return (
            Round(self.echo, self.sign, self.echo_serial, self.sign_serial, self.sign_many_keys),
        )


@dataclass(frozen=True, slots=True)
class Processes:
    """Whose CPU the bench meters besides its own: the fleet's signers and the broker."""

    signers: tuple[int, ...] = ()
    broker: int | None = None


async def measure_fleet(
    amqp_url: str,
    signers: int,
    timing: Timing,
    progress: Progress,
    many_keys: int = 0,
    *,
    repeat: int = 1,
    processes: Processes | None = None,
) -> FleetResults:
    """``echo`` beside ``sign`` and ``echo_serial`` beside ``sign_serial``, then ``batch``.

    Each pair is measured in alternating slices (:func:`interleaved`): the targets are their
    ratios, and measured one after the other they would also compare two moments of a machine
    whose speed drifts. With ``many_keys``, ``sign_many_keys`` (each request a random key of the
    set) is a third scenario of the first interleaving, after a warm-up that signs with every
    key of the set ``signers + 1`` times (the signers' record caches then hold the set as a
    fleet serving it would have them: it measures the steady state, not a cold start).

    With ``repeat`` > 1 both interleavings run that many times, one after the other (issue 19:
    the ratios are judged on their median, and their spread is shown). ``processes`` names the
    processes whose CPU is metered beside this one's (the echo consumers are the bench's own).
    """
    processes = processes or Processes()
    digest = os.urandom(32)
    # The body a sign request carries, so the echo moves the same bytes.
    echo_body = SignRequest(key_id="zk-" + "0" * 20, digest=digest).model_dump_json(
        exclude_none=True
    )
    echo_queue = f"zandd-bench.echo.{uuid.uuid4().hex[:12]}"
    consumers = f"[{signers} consumer{'s' if signers > 1 else ''}]"
    at = f"[{signers} signer{'s' if signers > 1 else ''}]"
    async with await SigningClient.connect(amqp_url) as client:
        key = await client.create_key(label=_BENCH_LABEL)
        many = await key_set(client, many_keys, progress) if many_keys else None

        async def sign() -> object:
            return await client.sign(key.key_id, digest=digest)

        async def sign_batch() -> object:
            return await client.sign_batch(key.key_id, digests=[digest] * ITEMS_PER_MESSAGE)

        async with (
            _echo_consumers(amqp_url, echo_queue, signers, progress) as echo_pids,
            await EchoClient.connect(amqp_url, echo_queue) as echo_client,
        ):

            async def echo() -> object:
                return await echo_client.call(echo_body.encode())

            echo_meter = CpuMeter(workers=echo_pids, broker=processes.broker)
            sign_meter = CpuMeter(workers=processes.signers, broker=processes.broker)
            scenarios: list[tuple[str, Operation]] = [
                (f"echo {consumers}", echo),
                (f"sign {at}", sign),
            ]
            if many is not None:
                scenarios.append(
                    (
                        f"sign_many_keys {at}",
                        await _many_keys_operation(client, many, signers, digest, progress),
                    )
                )
            meters = {label: sign_meter for label, _ in scenarios}
            meters[scenarios[0][0]] = echo_meter
            serial = [(f"echo_serial {consumers}", echo), (f"sign_serial {at}", sign)]
            serial_meters = {serial[0][0]: echo_meter, serial[1][0]: sign_meter}
            rounds: list[Round] = []
            for number in range(1, repeat + 1):
                if repeat > 1:
                    progress.note(f"repeat {number}/{repeat}")
                echo_run, sign_run, *many_runs = await interleaved(
                    scenarios,
                    timing.load(CONCURRENCY),
                    timing.warmup(CONCURRENCY),
                    progress,
                    slices=SLICES,
                    meters=meters,
                )
                progress.note(f"echo {consumers}: {_throughput(echo_run, 'req/s')}")
                progress.note(f"sign {at}: {_throughput(sign_run, 'req/s')}")
                for run in many_runs:
                    progress.note(
                        f"sign_many_keys {at}: {_throughput(run, 'req/s')}, "
                        f"{run.per_s / sign_run.per_s:.2f}x sign"
                    )
                echo_serial, sign_serial = await interleaved(
                    serial,
                    timing.load(1),
                    timing.warmup(1),
                    progress,
                    slices=SLICES,
                    meters=serial_meters,
                )
                progress.note(f"echo_serial {consumers}: {_latency(echo_serial)}")
                progress.note(
                    f"sign_serial {at}: {_latency(sign_serial)}, "
                    f"{sign_serial.p50_ms / echo_serial.p50_ms:.2f}x echo_serial p50"
                )
                rounds.append(
                    Round(
                        echo_run,
                        sign_run,
                        echo_serial,
                        sign_serial,
                        many_runs[0] if many_runs else None,
                    )
                )
        batch = await measured(
            f"batch {at}",
            sign_batch,
            timing.load(BATCH_IN_FLIGHT),
            timing.warmup(BATCH_IN_FLIGHT),
            progress,
        )
        progress.end(f"{batch.per_s * ITEMS_PER_MESSAGE:,.0f} signatures/s")
    many_rounds = [r.sign_many_keys for r in rounds if r.sign_many_keys is not None]
    return FleetResults(
        signers,
        Run.merged([r.echo for r in rounds]),
        Run.merged([r.echo_serial for r in rounds]),
        Run.merged([r.sign for r in rounds]),
        Run.merged([r.sign_serial for r in rounds]),
        batch,
        Run.merged(many_rounds) if many_rounds else None,
        many,
        tuple(rounds),
    )


async def _many_keys_operation(
    client: SigningClient, many: KeySet, signers: int, digest: bytes, progress: Progress
) -> Operation:
    """The ``sign_many_keys`` request, once every key was signed with ``signers + 1`` times.

    The broker, not the bench, picks the signer of each request: after ``p`` passes in
    shuffled orders a signer has not seen a given key with odds ``(1 - 1/signers) ** p``
    (2 signers, 3 passes: 1 key in 8), and the measured slices load those on first use.
    """
    rng = random.Random()  # noqa: S311 - which key a request uses is no secret
    order = list(many.key_ids)
    pending: list[str] = []
    for _ in range(signers + 1):
        rng.shuffle(order)
        pending += order

    async def warm() -> object:
        return await client.sign(pending.pop(), digest=digest)

    progress.begin(f"sign_many_keys (warming caches: {len(pending):,} signatures)")
    warmup = Load(
        concurrency=CONCURRENCY,
        duration_s=0.0,
        min_operations=len(pending),
        max_operations=len(pending),
    )
    await drive(warm, warmup, progress)
    progress.end("done")

    async def sign_many() -> object:
        return await client.sign(random_key(many.key_ids, rng), digest=digest)

    return sign_many


async def measure_sign(
    amqp_url: str, signers: int, timing: Timing, progress: Progress, name: str
) -> Run:
    """``sign`` alone, at the same concurrency as in :func:`measure_fleet` (``name`` labels it)."""
    digest = os.urandom(32)
    async with await SigningClient.connect(amqp_url) as client:
        key = await client.create_key(label=_BENCH_LABEL)

        async def sign() -> object:
            return await client.sign(key.key_id, digest=digest)

        run = await measured(
            f"{name} [{signers} signer{'s' if signers > 1 else ''}]",
            sign,
            timing.load(CONCURRENCY),
            timing.warmup(CONCURRENCY),
            progress,
        )
    progress.end(f"{_throughput(run, 'req/s')}")
    return run


async def measure_keygen(amqp_url: str, max_keys: int, timing: Timing, progress: Progress) -> Run:
    """``key.create`` one after the other, at most ``max_keys`` of them (they stay in the vault)."""
    async with await SigningClient.connect(amqp_url) as client:

        async def create() -> object:
            return await client.create_key(label=_BENCH_LABEL)

        load = Load(
            concurrency=1,
            duration_s=timing.duration_s,
            min_operations=min(MIN_OPERATIONS, max_keys),
            max_operations=max_keys,
        )
        warmup = Load(concurrency=1, duration_s=0.0, min_operations=1, max_operations=1)
        run = await measured("keygen", create, load, warmup, progress)
    progress.end(_latency(run))
    return run


@asynccontextmanager
async def _echo_consumers(
    amqp_url: str, queue: str, count: int, progress: Progress
) -> AsyncIterator[tuple[int, ...]]:
    """``count`` echo consumer processes on ``queue``, their pids; stopped and the queue
    deleted on exit."""
    env = {**os.environ, "ZANDD_AMQP_URL": amqp_url}
    processes: list[asyncio.subprocess.Process] = []
    # Declared here first: RabbitMQ 3.10 can fail (541 INTERNAL_ERROR) when several
    # connections declare the same new quorum queue at once.
    await _declare_queue(amqp_url, queue)
    try:
        for _ in range(count):
            processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "workers.bench.echo",
                    queue,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                )
            )
        for process in processes:
            await _until_ready(process)
        yield tuple(process.pid for process in processes)
    finally:
        for process in processes:
            await _stop(process)
        await _delete_queue(amqp_url, queue, progress)


async def _until_ready(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None  # started with stdout=PIPE
    try:
        async with asyncio.timeout(_ECHO_READY_TIMEOUT_S):
            line = await process.stdout.readline()
    except TimeoutError:
        raise ZanddError(
            f"the echo consumer was not ready within {_ECHO_READY_TIMEOUT_S:g} s"
        ) from None
    if line.decode().strip() != READY_LINE:
        code = await process.wait()
        raise ZanddError(f"the echo consumer exited with code {code} before it was ready")


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with suppress(ProcessLookupError):
            process.terminate()
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for loses a Ctrl-C that arrives just as
        # the process exits, and Ctrl-C makes the echo process exit at that very moment.
        async with asyncio.timeout(_ECHO_STOP_TIMEOUT_S):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()


async def _declare_queue(amqp_url: str, queue: str) -> None:
    connection = await connect(amqp_url, connection_name="zandd-bench")
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments=echo_queue_arguments())


async def _delete_queue(amqp_url: str, queue: str, progress: Progress) -> None:
    try:
        connection = await connect(amqp_url, connection_name="zandd-bench")
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue)
    except (ZanddError, AMQPError) as exc:
        progress.note(f"could not delete the echo queue {queue}: {exc}")


def _throughput(run: Run, unit: str) -> str:
    return f"{run.per_s:,.0f} {unit}, p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms"


def _latency(run: Run) -> str:
    return f"p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms ({run.per_s:,.0f}/s)"
