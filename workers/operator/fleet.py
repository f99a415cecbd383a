"""``zandd up``: the whole fleet on one machine, supervised.

Starts a swtpm when the host has no TPM device and none is listening, creates the KEK ring
when missing (from the TPM's RNG, sealed to the TPM), runs the keygen worker and N signers as
child processes, restarts a child that dies (with backoff), and stops everything on
Ctrl-C/SIGTERM.

The supervisor opens the ring once (unsealing it with the TPM) and hands it to each child
through an inherited pipe: the child reads it from the descriptor named by ``ZANDD_KEK_FD``
at start, so the ring is in no environment variable and no file in the clear. A child does not
re-read the ring file; the supervisor watches it instead, and when it changes (``zandd vault
rotate-kek``) opens it again and replaces the children one after the other with ones that get
the new ring.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from aio_pika.abc import AbstractRobustConnection

from contracts.amqp import connect
from contracts.errors import BrokerUnavailable, ConfigurationError, ZanddError
from contracts.text import printable
from contracts.topology import KEYGEN_QUEUE, SIGN_QUEUE, QueueMissing, consumer_count
from vault.kek import KekRing, ring_file_stamp
from workers.service.config import Settings
from workers.service.hygiene import harden_for_key_material
from workers.service.ringsetup import describe, file_sealer, open_or_create_ring, tpm_sealer

log = logging.getLogger("zandd.up")

READY_TIMEOUT_S = 60.0
_POLL_INTERVAL_S = 0.2
_MAX_RESTART_DELAY_S = 30.0
_PR_SET_PDEATHSIG = 1
#: How often the supervisor looks whether the ring file changed (a rotation).
RING_POLL_INTERVAL_S = 2.0
#: A child's exit code for an error no restart mends (``workers.commands.base.EXIT_PERMANENT``).
EXIT_PERMANENT = 3
#: The most of a child's cause the supervisor reads (one sentence).
_MAX_CAUSE_BYTES = 2000


@dataclass
class _Child:
    role: str
    argv: list[str]
    env: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    last_exit: int | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    #: Set while the supervisor replaces the child on purpose (a new ring): no backoff.
    replacing: bool = False
    #: The read end of the pipe the running child reports a permanent error's cause on.
    cause_fd: int | None = None


def ensure_tpm(settings: Settings, stack: ExitStack) -> str:
    """The TCTI the fleet uses, starting a swtpm under the data dir when needed."""
    from workers.keygen.swtpm import port_open, serving_swtpm, start_swtpm
    from workers.keygen.tpm import default_tcti

    if settings.tpm_tcti:
        return settings.tpm_tcti
    device = default_tcti()
    if device:
        return device
    if port_open("127.0.0.1", settings.swtpm_port):
        # Only this fleet's own swtpm (its state dir) is reused: another fleet's would mix two
        # fleets' keys in one TPM, and anything else is not a TPM at all.
        if serving_swtpm(settings.swtpm_dir, settings.swtpm_port) is None:
            raise ConfigurationError(
                f"port {settings.swtpm_port} is taken by something other than this fleet's "
                f"swtpm (state in {settings.swtpm_dir}): stop it, or give this fleet another "
                "port (ZANDD_SWTPM_PORT, and the next one is its control port), or set "
                "ZANDD_TPM_TCTI if that is the TPM you mean"
            )
        log.info("using this fleet's swtpm already listening on port %d", settings.swtpm_port)
        return settings.local_swtpm_tcti
    swtpm = start_swtpm(settings.swtpm_dir, port=settings.swtpm_port)
    stack.callback(swtpm.stop)
    log.info("started swtpm (state in %s) on port %d", settings.swtpm_dir, swtpm.port)
    return swtpm.tcti


async def ensure_kek_ring(settings: Settings, tcti: str) -> KekRing:
    """The KEK ring, created from the TPM's RNG when there is none yet and the vault is empty.

    Raises:
        ConfigurationError: the ring does not open every record of the vault (or there is no
            ring and the vault has records), unless ``settings.allow_unreadable``.
    """
    from workers.keygen.tpm import Tpm

    # zandd up holds the ring from here on: no core dump or ptrace may reach it.
    harden_for_key_material(lock_memory=settings.lock_memory)

    def create(path: Path) -> KekRing:
        sealer = tpm_sealer(settings, tcti, pcrs=settings.kek_ring_pcrs)
        with Tpm(tcti) as tpm:
            return KekRing.create(path, random_bytes=tpm.get_random, sealer=sealer)

    ring, created = await open_or_create_ring(settings, create, tcti)
    if created:
        log.info("created the KEK ring %s from the TPM's RNG", settings.resolved_kek_file)
    log.info("%s", describe(ring, settings))
    return ring


class Fleet:
    """The supervised child processes of ``zandd up``."""

    def __init__(
        self,
        settings: Settings,
        *,
        signers: int,
        child_env: dict[str, str],
        ring: KekRing | None = None,
    ) -> None:
        self._settings = settings
        self._stopping = False
        # The ring handed to each child on a pipe; None: children read the ring file.
        self._ring_json = None if ring is None else ring.to_json()
        cli = [sys.executable, "-m", "workers.cli"]
        self._children = [_Child("keygen", [*cli, "keygen-worker"], _numbered(child_env, 0))] + [
            _Child(f"signer-{n}", [*cli, "signer"], _numbered(child_env, n))
            for n in range(1, signers + 1)
        ]
        self.signers = signers
        self.amqp_url = settings.amqp_url
        #: Set when a child exits ``EXIT_PERMANENT``: the fleet stops, ``failure`` says why.
        self.failed = asyncio.Event()
        self.failure = ""

    async def start(self) -> None:
        """Start every child under supervision."""
        for child in self._children:
            child.task = asyncio.create_task(self._supervise(child))

    async def _supervise(self, child: _Child) -> None:
        delay_s = 0.5
        while not self._stopping:
            child.process = await self._spawn(child)
            child.last_exit = await child.process.wait()
            cause = _read_cause(child)
            if self._stopping:
                return
            if child.last_exit == EXIT_PERMANENT:
                self.failure = (
                    f"{child.role} cannot run: {cause or 'a permanent error (see its log above)'}"
                )
                log.error("%s; stopping the fleet", self.failure)
                self.failed.set()
                return
            if child.replacing:
                child.replacing = False
                continue
            child.restarts += 1
            log.warning(
                "%s exited with code %s; restarting in %.1f s", child.role, child.last_exit, delay_s
            )
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, _MAX_RESTART_DELAY_S)

    async def _spawn(self, child: _Child) -> asyncio.subprocess.Process:
        # A session of its own: Ctrl-C in the terminal reaches only the supervisor, which
        # then stops the children in order (they would exit and be restarted otherwise).
        # The child reports a permanent error's cause on a pipe of its own (ZANDD_CAUSE_FD).
        cause_read, cause_write = os.pipe()
        child.cause_fd = cause_read
        env = {**child.env, "ZANDD_CAUSE_FD": str(cause_write)}
        if self._ring_json is None:
            try:
                return await asyncio.create_subprocess_exec(
                    *child.argv, env=env, start_new_session=True, pass_fds=(cause_write,)
                )
            finally:
                os.close(cause_write)
        # os.pipe() is close-on-exec: only this child inherits the read end (pass_fds), and
        # no child inherits the write end.
        read_fd, write_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *child.argv,
                env={**env, "ZANDD_KEK_FD": str(read_fd)},
                start_new_session=True,
                pass_fds=(read_fd, cause_write),
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
            os.close(cause_write)
        await asyncio.to_thread(_write_and_close, write_fd, self._ring_json, child.role)
        return process

    async def hand_over(self, ring: KekRing) -> None:
        """Give every child ``ring``: replace them one after the other (each drains first)."""
        self._ring_json = ring.to_json()
        for child in self._children:
            process = child.process
            if self._stopping or process is None or process.returncode is not None:
                continue
            child.replacing = True
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self._settings.drain_timeout_s + 5.0):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()

    def signer_pids(self) -> tuple[int, ...]:
        """The process ids of the signers running now (the bench meters their CPU)."""
        return tuple(
            child.process.pid
            for child in self._children
            if child.role.startswith("signer")
            and child.process is not None
            and child.process.returncode is None
        )

    def describe_failures(self) -> str:
        """Which children died, for an error message."""
        dead = [
            f"{c.role} exited {c.restarts}x (last code {c.last_exit})"
            for c in self._children
            if c.restarts
        ]
        return "; ".join(dead) or "no worker exited"

    async def stop(self) -> None:
        """SIGTERM every child, wait for their drain, kill what is left."""
        self._stopping = True
        running = [c.process for c in self._children if c.process and c.process.returncode is None]
        for process in running:
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        bound_s = self._settings.drain_timeout_s + 5.0
        for process in running:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that arrives just as the child exits.
                async with asyncio.timeout(bound_s):
                    await process.wait()
            except TimeoutError:
                log.warning("worker %d did not stop within %.0f s: killed", process.pid, bound_s)
                process.kill()
                await process.wait()
        for child in self._children:
            if child.task:
                child.task.cancel()
                with suppress(asyncio.CancelledError):
                    await child.task


async def wait_until_ready(
    amqp_url: str, signers: int, timeout_s: float = READY_TIMEOUT_S, *, keygens: int = 1
) -> None:
    """Wait until the keygen queue has ``keygens`` consumers and the sign queue ``signers``."""
    connection = await connect(amqp_url, connection_name="zandd-up")
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                counts = await consumer_counts(connection)
                if counts[KEYGEN_QUEUE] >= keygens and counts[SIGN_QUEUE] >= signers:
                    return
                await asyncio.sleep(_POLL_INTERVAL_S)
    finally:
        await connection.close()


async def consumer_counts(connection: AbstractRobustConnection) -> dict[str, int]:
    """How many consumers the keygen and sign queues have (0 for a queue not declared yet).

    A broker that does not answer counts as no consumers on either queue: the caller polls.
    """
    counts: dict[str, int] = {}
    for name in (KEYGEN_QUEUE, SIGN_QUEUE):
        try:
            counts[name] = await consumer_count(connection, name)
        except QueueMissing:
            counts[name] = 0
        except BrokerUnavailable:
            return {KEYGEN_QUEUE: 0, SIGN_QUEUE: 0}
    return counts


def child_environment(settings: Settings, tcti: str) -> dict[str, str]:
    """The environment that makes every child see exactly this fleet's configuration."""
    env = dict(os.environ)
    env.update(
        ZANDD_SUPERVISED="1",
        ZANDD_AMQP_URL=settings.amqp_url,
        ZANDD_DATA_DIR=str(settings.data_dir.absolute()),
        ZANDD_VAULT_URL=settings.resolved_vault_url,
        ZANDD_KEK_FILE=str(settings.resolved_kek_file.absolute()),
        ZANDD_TPM_TCTI=tcti,
        ZANDD_LOG_LEVEL=settings.log_level,
        ZANDD_LOG_FORMAT=settings.log_format,
        ZANDD_TRACES_EXPORTER=settings.traces_exporter,
        ZANDD_DECLARE_TOPOLOGY=str(settings.declare_topology).lower(),
        ZANDD_SIGN_SHARDS=str(settings.sign_shards),
        ZANDD_TRANSPORT=settings.transport,
        ZANDD_ALLOW_UNREADABLE=str(settings.allow_unreadable).lower(),
    )
    if settings.metrics_port is not None:
        env["ZANDD_METRICS_PORT"] = str(settings.metrics_port)
    for name in ("ZANDD_QUOTA_REQUESTS_PER_S", "ZANDD_QUOTA_SIGNATURES_PER_S"):
        env.pop(name, None)  # unset in the settings: unset for the children too
    env.update(quota_environment(settings))
    return env


def quota_environment(settings: Settings) -> dict[str, str]:
    """The ``ZANDD_QUOTA_*`` variables that give a child these settings' quotas."""
    env = {
        "ZANDD_QUOTA_OVERRIDES": json.dumps(
            {
                name: override
                if isinstance(override, str)
                else override.model_dump(exclude_unset=True)
                for name, override in settings.quota_overrides.items()
            }
        )
    }
    for name, rate in (
        ("ZANDD_QUOTA_REQUESTS_PER_S", settings.quota_requests_per_s),
        ("ZANDD_QUOTA_SIGNATURES_PER_S", settings.quota_signatures_per_s),
    ):
        if rate is not None:
            env[name] = repr(rate)
    return env


def report_cause(message: str) -> None:
    """In a child of ``zandd up`` that exits ``EXIT_PERMANENT``: tell the supervisor why."""
    fd = os.environ.get("ZANDD_CAUSE_FD")
    if fd is None or not fd.isdigit():
        return
    with suppress(OSError):
        os.write(int(fd), message.encode()[:_MAX_CAUSE_BYTES])


def _read_cause(child: _Child) -> str:
    """What an exited child reported on its cause pipe (one printable line; "" for nothing)."""
    fd, child.cause_fd = child.cause_fd, None
    if fd is None:
        return ""
    try:
        # Every write end is closed now (the child exited): this read does not block.
        data = os.read(fd, _MAX_CAUSE_BYTES)
    except OSError:
        data = b""
    finally:
        os.close(fd)
    return printable(data.decode(errors="replace"), max_chars=_MAX_CAUSE_BYTES).strip()


def _write_and_close(fd: int, data: bytes, role: str) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        log.warning("%s exited before it read the KEK ring", role)
    finally:
        os.close(fd)


def die_with_supervisor() -> None:
    """In a child of ``zandd up``: get SIGTERM when the supervisor dies, even by SIGKILL.

    The children run in sessions of their own (see ``Fleet._supervise``), so nothing else
    would stop them; Linux's parent-death signal does it.
    """
    if os.environ.get("ZANDD_SUPERVISED") != "1" or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to be stopped with the supervisor: errno %d", ctypes.get_errno())
    if os.getppid() == 1:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _numbered(env: dict[str, str], index: int) -> dict[str, str]:
    """Child ``index``'s environment: its own metrics port (base + index: keygen 0, signer n)."""
    base = env.get("ZANDD_METRICS_PORT")
    if base is None:
        return env
    return {**env, "ZANDD_METRICS_PORT": str(int(base) + index)}


async def run_up(
    settings: Settings,
    *,
    signers: int,
    after_ready: Callable[[], Awaitable[int]] | None = None,
) -> int:
    """Run the fleet until a signal arrives (or ``after_ready`` returns); the exit code."""
    if signers < 1:
        raise ConfigurationError("--signers must be at least 1")
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Fail on an unreachable broker before starting anything that would then have to stop.
    await (await connect(settings.amqp_url, connection_name="zandd-up")).close()
    with ExitStack() as stack:
        tcti = ensure_tpm(settings, stack)
        ring = await ensure_kek_ring(settings, tcti)
        stamp = ring_file_stamp(settings.resolved_kek_file)
        fleet = Fleet(
            settings, signers=signers, child_env=child_environment(settings, tcti), ring=ring
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await fleet.start()
        try:
            await _unless_failed(fleet, _until_ready(fleet))
            if after_ready is not None:
                return await _unless_failed(fleet, after_ready())
            await _unless_failed(fleet, _watch_ring(settings, tcti, fleet, stop, ring, stamp))
            return 0
        finally:
            log.info("stopping the fleet")
            await fleet.stop()


T = TypeVar("T")


async def _unless_failed(fleet: Fleet, work: Awaitable[T]) -> T:
    """``work``'s result, unless a child fails permanently first: then ``ZanddError`` with its
    cause (the fleet is stopped by the caller)."""
    task = asyncio.ensure_future(work)
    failed = asyncio.ensure_future(fleet.failed.wait())
    try:
        await asyncio.wait({task, failed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        failed.cancel()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    if fleet.failed.is_set() and (task.cancelled() or task.exception() is not None):
        raise ZanddError(
            f"{fleet.failure}; the fleet stopped (a restart would fail the same way: fix the "
            "cause, then run zandd up again)"
        )
    return task.result()


async def _until_ready(fleet: Fleet) -> None:
    try:
        await wait_until_ready(fleet.amqp_url, fleet.signers)
    except TimeoutError:
        raise ZanddError(
            f"the fleet was not ready within {READY_TIMEOUT_S:.0f} s: {fleet.describe_failures()}"
        ) from None
    log.info("fleet ready: keygen + %d signers", fleet.signers)


async def _watch_ring(
    settings: Settings,
    tcti: str,
    fleet: Fleet,
    stop: asyncio.Event,
    ring: KekRing,
    stamp: tuple[int, int, int] | None,
) -> None:
    """Until ``stop``: when the ring file changes, open it and hand it to the children."""
    path = settings.resolved_kek_file
    while not stop.is_set():
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RING_POLL_INTERVAL_S)
        current = ring_file_stamp(path)
        if stop.is_set() or current == stamp:
            continue
        stamp = current
        try:
            fresh = await asyncio.to_thread(
                lambda: KekRing.load(path, sealer=file_sealer(settings, path, tcti))
            )
        except ZanddError as exc:
            log.error("the KEK ring changed but does not open (%s); workers keep theirs", exc)
            continue
        lost = sorted(set(ring.kek_ids) - set(fresh.kek_ids))
        if lost:
            log.error(
                "the KEK ring %s changed and lost KEK ids %s: not handed to the workers",
                path,
                ", ".join(lost),
            )
            continue
        log.info("the KEK ring changed (active %s): replacing the workers", fresh.active.kek_id)
        ring = fresh
        # A stop during the hand-over wins: the children are stopped, not replaced.
        handing = asyncio.create_task(fleet.hand_over(ring))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({handing, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not handing.done():
            handing.cancel()
        with suppress(asyncio.CancelledError):
            await handing
