"""The fault suite: every accepted request ends in exactly one answer, whatever breaks.

Workers run as real processes (``python -m workers.cli signer|keygen-worker``) against the real
broker (a private vhost), a real swtpm and a real SQLite vault, so SIGKILL and SIGTERM mean
what they mean in production. Each test prints one line of figures and fails if anything is
lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts.client import SigningClient
from contracts.crypto import load_public_key, verify_signature
from contracts.errors import ZanddError
from contracts.models import SignReply
from contracts.topology import DEAD_LETTER_QUEUE, EXCHANGE, KEYGEN_QUEUE, SIGN_QUEUE
from vault.kek import KekRing
from vault.store import open_store
from workers.fleet import consumer_counts

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tpm, pytest.mark.faults]

LOAD_TIMEOUT_S = 90.0


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

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZANDD_")}
        env.update(
            ZANDD_AMQP_URL=self.amqp_url,
            ZANDD_DATA_DIR=str(self.data_dir),
            ZANDD_TPM_TCTI=self.tcti,
            ZANDD_MAX_BACKOFF_S="1",
            ZANDD_DRAIN_TIMEOUT_S="20",
            ZANDD_LOG_LEVEL="WARNING",
        )
        return env

    async def start(self, name: str) -> Worker:
        role = "keygen-worker" if name.startswith("keygen") else "signer"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "workers.cli", role, env=self.env
        )
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


@pytest.fixture
async def processes(
    empty_amqp_url: str, swtpm_tcti: str, tmp_path: Path
) -> AsyncIterator[ProcessFleet]:
    KekRing.create(tmp_path / "kek-ring.json")
    fleet = ProcessFleet(empty_amqp_url, tmp_path, swtpm_tcti)
    try:
        yield fleet
    finally:
        await fleet.stop_all()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Print one line of figures in pytest's output, even while output is captured."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        if reporter is None:
            return
        if capture is None:
            reporter.write_line(line)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    return write


@dataclass
class LoadResult:
    sent: int
    answered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    replies: dict[int, SignReply] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.sent - self.answered - sum(self.errors.values())


async def sign_load(
    client: SigningClient,
    key_id: str,
    count: int,
    *,
    on_answer: Callable[[int], None] | None = None,
) -> LoadResult:
    """``count`` concurrent sign calls; timeouts count as lost, typed errors as errors."""
    result = LoadResult(sent=count)

    async def one(index: int) -> None:
        try:
            reply = await client.sign(key_id, f"fault {index}".encode(), timeout_s=LOAD_TIMEOUT_S)
        except ZanddError as exc:
            if exc.code.value == "deadline_exceeded":
                return  # lost: nobody answered in time
            result.errors[exc.code.value] += 1
            return
        result.replies[index] = reply
        result.answered += 1
        if on_answer is not None:
            on_answer(result.answered)

    await asyncio.gather(*(one(i) for i in range(count)))
    return result


def all_verify(public_pem: str, result: LoadResult) -> bool:
    key = load_public_key(public_pem)
    return all(
        verify_signature(key, reply.signature, message=f"fault {i}".encode())
        for i, reply in result.replies.items()
    )


def when(count: int) -> tuple[asyncio.Event, Callable[[int], None]]:
    """An event set once ``count`` answers have arrived, and the callback that counts."""
    reached = asyncio.Event()

    def seen(answered: int) -> None:
        if answered >= count:
            reached.set()

    return reached, seen


async def dead_letters(amqp_url: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        return queue.declaration_result.message_count or 0


def keygen_subscribers(amqp_url: str) -> int:
    """Active and waiting consumers of zandd.keygen (the queue's consumer count shows only the
    single active one)."""
    vhost = amqp_url.rsplit("/", 1)[-1]
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_consumers", "-p", vhost, "queue_name"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
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


async def test_sigkill_one_of_two_signers_under_load(
    processes: ProcessFleet, report: Callable[[str], None]
) -> None:
    await started(processes, signers=2)
    async with await SigningClient.connect(processes.amqp_url) as client:
        key = await client.create_key()
        reached, seen = when(500)
        load = asyncio.create_task(sign_load(client, key.key_id, 3000, on_answer=seen))
        await reached.wait()
        processes.signal("signer-1", signal.SIGKILL)
        result = await load
        duplicates = client.unmatched_replies
    report(
        f"faults: kill-signer sent={result.sent} answered={result.answered} lost={result.lost} "
        f"errors={sum(result.errors.values())} duplicates={duplicates}"
    )
    assert (result.answered, result.lost, dict(result.errors)) == (3000, 0, {})
    assert all_verify(key.public_key_pem, result)
    assert await processes.exit_code("signer-1") == -signal.SIGKILL
    assert await dead_letters(processes.amqp_url) == 0


async def test_rolling_sigterm_restart_of_every_signer_loses_nothing(
    processes: ProcessFleet, report: Callable[[str], None]
) -> None:
    await started(processes, signers=2)
    async with await SigningClient.connect(processes.amqp_url) as client:
        key = await client.create_key()
        reached, seen = when(300)
        load = asyncio.create_task(sign_load(client, key.key_id, 3000, on_answer=seen))
        await reached.wait()
        for old, new in (("signer-1", "signer-3"), ("signer-2", "signer-4")):
            await processes.start(new)
            await processes.wait_for_consumers(signers=3, keygens=1)
            processes.signal(old, signal.SIGTERM)
            assert await processes.exit_code(old) == 0  # drained, not killed
        result = await load
        duplicates = client.unmatched_replies
    report(
        f"faults: rolling-restart sent={result.sent} answered={result.answered} "
        f"lost={result.lost} errors={sum(result.errors.values())} duplicates={duplicates}"
    )
    assert (result.answered, result.lost, dict(result.errors)) == (3000, 0, {})
    assert all_verify(key.public_key_pem, result)
    assert processes.alive() == ["keygen-1", "signer-3", "signer-4"]


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@pytest.mark.skipif(
    os.environ.get("ZANDD_TEST_BROKER_RESTART") != "1",
    reason="restarts the whole local broker: ops/test (and CI) set ZANDD_TEST_BROKER_RESTART=1",
)
async def test_broker_restart_under_load_answers_everything_after_recovery(
    processes: ProcessFleet, report: Callable[[str], None]
) -> None:
    await started(processes, signers=2)
    async with await SigningClient.connect(processes.amqp_url, retry=True) as client:
        key = await client.create_key()
        reached, seen = when(300)
        load = asyncio.create_task(sign_load(client, key.key_id, 3000, on_answer=seen))
        await reached.wait()
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        try:
            await asyncio.sleep(2)  # the outage itself: nothing to wait for but time
        finally:
            await asyncio.to_thread(rabbitmqctl, "start_app")
        result = await load
        duplicates, resent = client.unmatched_replies, client.resent_requests
    report(
        f"faults: broker-restart sent={result.sent} answered={result.answered} "
        f"lost={result.lost} errors={sum(result.errors.values())} resent={resent} "
        f"duplicates={duplicates}"
    )
    assert (result.answered, result.lost, dict(result.errors)) == (3000, 0, {})
    assert resent > 0  # the outage really hit calls in flight
    assert all_verify(key.public_key_pem, result)
    assert processes.alive() == ["keygen-1", "signer-1", "signer-2"]


async def test_vault_locked_for_seconds_nothing_dead_lettered(
    processes: ProcessFleet, report: Callable[[str], None]
) -> None:
    await started(processes, signers=2)
    vault_file = processes.data_dir / "vault.db"
    lock_s = 12.0  # longer than the vault's 10 s busy timeout: writers get "database is locked"
    async with await SigningClient.connect(processes.amqp_url) as client:
        key = await client.create_key()
        holder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(float(sys.argv[2])); "
            "c.execute('COMMIT')",
            str(vault_file),
            str(lock_s),
            stdout=subprocess.PIPE,
        )
        assert holder.stdout is not None
        assert (await holder.stdout.readline()).strip() == b"locked"
        creates = [
            client.create_key(request_id=f"locked-{i}", timeout_s=LOAD_TIMEOUT_S) for i in range(10)
        ]
        signs = sign_load(client, key.key_id, 1000)
        results = await asyncio.gather(*creates, signs, return_exceptions=True)
        await holder.wait()
    created = [r for r in results[:10] if not isinstance(r, BaseException)]
    load = results[10]
    assert isinstance(load, LoadResult)
    dead = await dead_letters(processes.amqp_url)
    report(
        f"faults: vault-locked lock_s={lock_s:g} creates=10 created={len(created)} "
        f"signs={load.sent} answered={load.answered} lost={load.lost} dead={dead}"
    )
    assert len(created) == 10, [r for r in results[:10] if isinstance(r, BaseException)]
    assert (load.answered, load.lost) == (1000, 0)
    assert dead == 0
    assert processes.alive() == ["keygen-1", "signer-1", "signer-2"]


async def test_sigkill_active_keygen_standby_takes_over(
    processes: ProcessFleet, report: Callable[[str], None]
) -> None:
    await started(processes, signers=1, keygens=2)
    request_ids = [f"standby-{uuid.uuid4().hex[:8]}-{i}" for i in range(30)]
    async with await SigningClient.connect(processes.amqp_url) as client:
        answered = 0
        reached = asyncio.Event()

        async def create(request_id: str) -> str:
            nonlocal answered
            reply = await client.create_key(request_id=request_id, timeout_s=LOAD_TIMEOUT_S)
            answered += 1
            if answered >= 5:
                reached.set()
            return reply.key_id

        calls = [asyncio.create_task(create(r)) for r in request_ids]
        await reached.wait()
        processes.signal("keygen-1", signal.SIGKILL)
        key_ids = await asyncio.gather(*calls)
        signed = await client.sign(key_ids[-1], b"signed with a key the standby made")
        assert await client.verify_trusting_fleet(
            key_ids[-1], signed.signature, message=b"signed with a key the standby made"
        )
    store = await open_store(f"sqlite:///{processes.data_dir / 'vault.db'}")
    try:
        keys = await store.list_keys()
        records = {r.request_id: r.key_id for r in keys}
    finally:
        await store.close()
    report(
        f"faults: kill-active-keygen sent={len(request_ids)} answered={len(key_ids)} "
        f"keys={len(records)} duplicates={client.unmatched_replies}"
    )
    assert len(set(key_ids)) == 30
    assert {rid: records[rid] for rid in request_ids} == dict(
        zip(request_ids, key_ids, strict=True)
    )
    assert len(keys) == 30  # one key per request id, none made twice
    assert processes.alive() == ["keygen-2", "signer-1"]


# -- property-based barrage of malformed messages ----------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
FIELD_VALUES = st.one_of(
    JSON_VALUES,
    st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=!*- ",
        max_size=60,
    ),
)
BODIES = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(
            [
                "key_id",
                "message",
                "digest",
                "items",
                "version",
                "encoding",
                "label",
                "algorithm",
                "allowed_signers",
                "x",
            ]
        ),
        FIELD_VALUES,
        max_size=5,
    ).map(lambda d: json.dumps(d).encode()),
)
MALFORMED = st.fixed_dictionaries(
    {
        "operation": st.sampled_from(
            ["sign", "sign.batch", "key.public", "key.create", "sign.all", "", "key.delete"]
        ),
        "routing_key": st.sampled_from(["sign", "sign.batch", "key.public", "key.create"]),
        "body": BODIES,
        "content_type": st.sampled_from(
            ["application/json", "text/plain", "", "application/octet-stream"]
        ),
        "reply": st.booleans(),
        "message_id": st.one_of(
            st.none(), st.text(alphabet="abcdef0123456789", min_size=1, max_size=12)
        ),
    }
)


async def publish_barrage(amqp_url: str, messages: list[dict[str, object]]) -> tuple[int, int]:
    """Publish ``messages`` raw; return (replies expected, replies received)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        expected = 0
        for index, spec in enumerate(messages):
            expected += bool(spec["reply"])
            await exchange.publish(
                aio_pika.Message(
                    spec["body"],  # type: ignore[arg-type]
                    content_type=spec["content_type"] or None,  # type: ignore[arg-type]
                    type=spec["operation"] or None,  # type: ignore[arg-type]
                    message_id=spec["message_id"],  # type: ignore[arg-type]
                    correlation_id=f"barrage-{index}",
                    reply_to=replies.name if spec["reply"] else None,
                    user_id="guest",
                ),
                routing_key=str(spec["routing_key"]),
            )
        received = 0
        if expected:
            async with replies.iterator() as incoming, asyncio.timeout(60):
                async for message in incoming:
                    await message.ack()
                    received += 1
                    if received == expected:
                        break
        return expected, received


def test_barrage_of_malformed_messages_never_hurts(
    empty_amqp_url: str, swtpm_tcti: str, tmp_path: Path, report: Callable[[str], None]
) -> None:
    KekRing.create(tmp_path / "kek-ring.json")
    fleet = ProcessFleet(empty_amqp_url, tmp_path, swtpm_tcti)
    totals = Counter[str]()

    async def start() -> dict[str, int]:
        await started(fleet, signers=2)
        return {name: worker.process.pid for name, worker in fleet.workers.items()}

    loop = asyncio.new_event_loop()
    try:
        pids = loop.run_until_complete(start())

        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(MALFORMED, min_size=50, max_size=50))
        def barrage(messages: list[dict[str, object]]) -> None:
            expected, received = loop.run_until_complete(publish_barrage(empty_amqp_url, messages))
            totals["sent"] += len(messages)
            totals["replies_expected"] += expected
            totals["replies"] += received
            assert received == expected

        barrage()
        loop.run_until_complete(after_barrage_valid_requests_succeed(fleet, pids, totals))
    finally:
        loop.run_until_complete(fleet.stop_all())
        loop.close()
    report(
        f"faults: barrage sent={totals['sent']} replies={totals['replies']}/"
        f"{totals['replies_expected']} valid_after={totals['valid']} restarts={totals['restarts']}"
    )
    assert totals["sent"] == 600


async def after_barrage_valid_requests_succeed(
    fleet: ProcessFleet, pids: dict[str, int], totals: Counter[str]
) -> None:
    async with await SigningClient.connect(fleet.amqp_url) as client:
        key = await client.create_key()
        replies = await asyncio.gather(
            *(client.sign(key.key_id, f"ok {i}".encode()) for i in range(100))
        )
        public = load_public_key(key.public_key_pem)
        totals["valid"] = sum(
            verify_signature(public, r.signature, message=f"ok {i}".encode())
            for i, r in enumerate(replies)
        )
    assert totals["valid"] == 100
    now = {name: w.process.pid for name, w in fleet.workers.items()}
    totals["restarts"] = sum(now[name] != pid for name, pid in pids.items())
    assert now == pids
    assert fleet.alive() == sorted(pids)
