"""A fleet of worker processes, started and killed by hand (``zandd signer``, ``keygen-worker``)."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika

from contracts.topology import KEYGEN_QUEUE, SIGN_QUEUE
from tests.support.broker import rabbitmqctl
from tests.support.cli import ZANDD, environment
from workers.operator.fleet import consumer_counts


@dataclass
class Worker:
    name: str
    process: asyncio.subprocess.Process


@dataclass
class ProcessFleet:
    """Worker processes started and killed by hand."""

    amqp_url: str
    data_dir: Path
    tcti: str
    workers: dict[str, Worker] = field(default_factory=dict)
    #: More ``ZANDD_*`` settings for the workers started from now on.
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = environment(
            ZANDD_AMQP_URL=self.amqp_url,
            ZANDD_DATA_DIR=str(self.data_dir),
            ZANDD_TPM_TCTI=self.tcti,
            ZANDD_MAX_BACKOFF_S="1",
            ZANDD_DRAIN_TIMEOUT_S="20",
            ZANDD_LOG_LEVEL="WARNING",
        )
        env.update(self.settings)
        return env

    async def start(self, name: str) -> Worker:
        role = "keygen-worker" if name.startswith("keygen") else "signer"
        process = await asyncio.create_subprocess_exec(*ZANDD, role, env=self.env)
        worker = Worker(name, process)
        self.workers[name] = worker
        return worker

    def signal(self, name: str, signum: signal.Signals) -> None:
        self.workers[name].process.send_signal(signum)

    async def exit_code(self, name: str) -> int:
        return await asyncio.wait_for(self.workers[name].process.wait(), 60)

    async def wait_for_consumers(self, *, signers: int, keygens: int) -> None:
        """Wait until the queues have exactly these consumer counts (zandd.keygen counts only
        its single active consumer)."""
        connection = await aio_pika.connect_robust(self.amqp_url)
        async with connection, asyncio.timeout(60):
            while True:
                counts = await consumer_counts(connection)
                if counts == {SIGN_QUEUE: signers, KEYGEN_QUEUE: keygens}:
                    return
                await asyncio.sleep(0.1)

    async def stop_all(self) -> None:
        for worker in self.workers.values():
            if worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers.values():
            try:
                await asyncio.wait_for(worker.process.wait(), 30)
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()

    def alive(self) -> list[str]:
        return sorted(n for n, w in self.workers.items() if w.process.returncode is None)


def keygen_subscribers(amqp_url: str) -> int:
    """Active and waiting consumers of zandd.keygen (the queue's consumer count shows only the
    single active one)."""
    vhost = amqp_url.rsplit("/", 1)[-1]
    listing = rabbitmqctl("list_consumers", "-p", vhost, "queue_name")
    return sum(line.strip() == KEYGEN_QUEUE for line in listing.splitlines())


async def started(fleet: ProcessFleet, *, signers: int, keygens: int = 1) -> None:
    for n in range(1, keygens + 1):
        await fleet.start(f"keygen-{n}")
        # One at a time: the first keygen worker to subscribe is the active one. The broker
        # offers no event for a new subscriber: poll its consumer list.
        for _ in range(300):
            if await asyncio.to_thread(keygen_subscribers, fleet.amqp_url) >= n:
                break
            await asyncio.sleep(0.2)
        else:
            raise TimeoutError(f"keygen-{n} did not subscribe to {KEYGEN_QUEUE}")
    for n in range(1, signers + 1):
        await fleet.start(f"signer-{n}")
    await fleet.wait_for_consumers(signers=signers, keygens=min(keygens, 1))
