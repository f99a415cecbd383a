"""Run one worker process (``zandd signer`` / ``zandd keygen-worker``) until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Mapping
from contextlib import AsyncExitStack
from functools import partial

from contracts.operations import Operation
from contracts.topology import KEYGEN_QUEUE, SIGN_QUEUE
from vault.kek import KekRing
from vault.store import open_store
from workers.config import Settings
from workers.probes import vault_answers
from workers.runtime import ConsumerRuntime, Handler, Probe

log = logging.getLogger("zandd.serve")


def resolve_tcti(settings: Settings) -> str:
    """The TCTI to use: configured, else the host's TPM device, else the local swtpm."""
    from workers.keygen.tpm import default_tcti

    return settings.tpm_tcti or default_tcti() or settings.local_swtpm_tcti


async def _serve(
    settings: Settings,
    queue: str,
    handlers: Mapping[Operation, Handler],
    prefetch: int,
    probe: Probe,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runtime = ConsumerRuntime(
        amqp_url=settings.amqp_url,
        queue=queue,
        handlers=handlers,
        prefetch=prefetch,
        limits=settings.limits,
        drain_timeout_s=settings.drain_timeout_s,
        name="zandd-" + queue.removeprefix("zandd."),
        probe=probe,
    )
    await runtime.run(stop)


async def serve_signer(settings: Settings, *, concurrency: int | None = None) -> None:
    """Serve ``zandd.sign`` until SIGTERM/SIGINT, then drain."""
    from workers.signer.worker import Signer

    ring = KekRing.load(settings.resolved_kek_file)
    store = await open_store(settings.resolved_vault_url)
    try:
        prefetch = concurrency or settings.signer_concurrency
        handlers = Signer(store, ring).handlers
        await _serve(settings, SIGN_QUEUE, handlers, prefetch, partial(vault_answers, store))
    finally:
        await store.close()


async def serve_keygen(settings: Settings) -> None:
    """Serve ``zandd.keygen`` until SIGTERM/SIGINT, then drain. Needs the TPM."""
    from workers.keygen.session import TpmSession
    from workers.keygen.worker import Keygen

    ring = KekRing.load(settings.resolved_kek_file)
    async with AsyncExitStack() as stack:
        # Opened on first use: a hot standby leaves the TPM to the active keygen worker.
        tpm = TpmSession(resolve_tcti(settings))
        stack.callback(tpm.close)
        log.info("keygen will use the TPM at %s", tpm.tcti)
        store = await open_store(settings.resolved_vault_url)
        stack.push_async_callback(store.close)
        keygen = Keygen(store, ring, tpm)
        await _serve(
            settings, KEYGEN_QUEUE, keygen.handlers, settings.keygen_concurrency, keygen.probe
        )
