"""Run one worker process (``zandd signer`` / ``zandd keygen-worker``) until SIGTERM.

``signer_worker`` and ``keygen_worker`` assemble a worker — handlers, audit hook, the tasks
beside the runtime — the same way for a process and for the in-process test fleet.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from contracts.brokers import single_urls
from contracts.errors import VaultUnavailable, ZanddError
from contracts.operations import Operation
from contracts.topology import KEYGEN_QUEUE, SIGN_QUEUE
from vault.audit import AuditLog
from vault.audit_chain import ChainKeys
from vault.kek import KekRing
from vault.store import VaultStore, open_store
from workers.audit.audit_head import AuditHeadPublisher, KeyedAppender
from workers.audit.auditing import Clock, RequestAuditor, utc_now
from workers.consumer.probes import vault_answers
from workers.consumer.runtime import (
    DEPENDENCY_ERRORS,
    Admission,
    AuditHook,
    ConsumerRuntime,
    Handler,
    Probe,
    topology_queue,
    transport_connect,
)
from workers.observability.metrics import Metrics
from workers.operator.health import TpmHeartbeat, heartbeat_path
from workers.service.config import Settings
from workers.service.events import EventPublisher, EventSubscriber
from workers.service.hygiene import harden_process
from workers.service.policy import AccessPolicy
from workers.service.quotas import Quotas, follow_consumers
from workers.service.ringsetup import accept, describe, load_ring
from workers.service.ringwatch import RingWatch

if TYPE_CHECKING:
    from workers.keygen.session import TpmSession

log = logging.getLogger("zandd.serve")


def resolve_tcti(settings: Settings) -> str:
    """The TCTI to use: configured, else the host's TPM device, else the local swtpm."""
    from workers.keygen.tpm import default_tcti

    return settings.tpm_tcti or default_tcti() or settings.local_swtpm_tcti


@dataclass(frozen=True, slots=True)
class Worker:
    """A worker's parts for the consumer runtime; what runs beside it lives in the stack."""

    queue: str
    handlers: Mapping[Operation, Handler]
    probe: Probe
    audit: AuditHook
    #: The per-principal quotas; None when ``ZANDD_QUOTA_*`` limit nobody (the default).
    admission: Admission | None = None
    #: The dependency errors its requests wait out (``ConsumerRuntime``'s ``waits_for``).
    waits_for: tuple[type[ZanddError], ...] = DEPENDENCY_ERRORS


async def signer_worker(
    settings: Settings,
    store: VaultStore,
    ring: KekRing,
    stack: AsyncExitStack,
    *,
    metrics: Metrics | None = None,
) -> Worker:
    """A signer: its handlers, its audit log, its subscription to ``zandd.events`` and the
    revalidation of its record cache.

    Returns once the subscription is bound, so a state change from then on reaches it.
    """
    from workers.signer.worker import Signer

    audit_log = _keyed_audit_log(store, ring, stack, metrics)
    signer = Signer(store, ring, AccessPolicy.from_settings(settings), metrics=metrics)
    subscriber = EventSubscriber(
        settings.amqp_url,
        signer.on_event,
        on_gap=signer.forget_events,
        declare=settings.declare_topology,
        max_backoff_s=settings.max_backoff_s,
        on_alias=signer.on_alias_event,
    )
    await _beside(stack, subscriber.run, subscriber.ready)
    # issue 19: cached records revalidated in batches, not read again one by one at their TTL;
    # stopped before the store closes (the stack closes in reverse).
    await _beside(stack, signer.revalidate_cache_forever)
    return Worker(
        SIGN_QUEUE,
        signer.handlers,
        partial(vault_answers, store),
        RequestAuditor(audit_log),
        await _quotas(settings, SIGN_QUEUE, stack, metrics),
    )


async def keygen_worker(
    settings: Settings,
    store: VaultStore,
    ring: KekRing,
    tpm: TpmSession,
    stack: AsyncExitStack,
    *,
    clock: Clock = utc_now,
    metrics: Metrics | None = None,
) -> Worker:
    """The keygen worker: key creation, the key lifecycle, and destruction when due."""
    from workers.audit.audit_checkpoint import AuditCheckpointer
    from workers.keygen.lifecycle import KeyLifecycle
    from workers.keygen.worker import Keygen

    events = EventPublisher(settings.amqp_url, declare=settings.declare_topology)
    stack.push_async_callback(events.close)
    heads = AuditHeadPublisher(
        store,
        ChainKeys(ring),
        events.publish,
        every_entries=settings.audit_head_every_entries,
        interval_s=settings.audit_head_interval_s,
        metrics=metrics,
    )
    # Stopped after the audit log is flushed (the stack closes in reverse), so the last head
    # published includes this worker's last entries.
    await _beside(stack, heads.run)
    checkpoints = AuditCheckpointer(
        store,
        ChainKeys(ring),
        tpm,
        events.publish,
        every_entries=settings.audit_checkpoint_every_entries,
        interval_s=settings.audit_checkpoint_interval_s,
    )
    # Like the heads: stopped after the audit log is flushed, so its last round sees them.
    await _beside(stack, checkpoints.run)
    audit_log = _keyed_audit_log(store, ring, stack, metrics)
    policy = AccessPolicy.from_settings(settings)
    keygen = Keygen(store, ring, tpm, policy, metrics=metrics)
    lifecycle = KeyLifecycle(
        store, ring, policy=policy, events=events, audit=audit_log, clock=clock
    )
    interval_s = settings.destroy_check_interval_s
    await _beside(stack, partial(lifecycle.destroy_due_forever, interval_s=interval_s))
    # issue 15, key writes: key.rotate, key.update and rotation when a key's period is over
    # (checked as often as destruction).
    from workers.keygen.versions import KeyVersions

    versions = KeyVersions(
        store, keygen, lifecycle, tpm, policy=policy, events=events, audit=audit_log, clock=clock
    )
    await _beside(stack, partial(versions.rotate_due_forever, interval_s=interval_s))
    await _beside(stack, TpmHeartbeat(heartbeat_path(settings), tpm.heartbeat).run)
    # issue 15, aliases: key.alias.set/delete, and an alias where a key id may be one
    # (resolved from the vault: the keygen worker is its writer).
    from workers.keygen.aliases import KeyAliases
    from workers.service.aliases import resolve_in_vault, resolving

    aliases = KeyAliases(store, ring, policy=policy, events=events, clock=clock)
    handlers = resolving(
        {**keygen.handlers, **lifecycle.handlers, **versions.handlers, **aliases.handlers},
        partial(resolve_in_vault, store, ring),
    )
    return Worker(
        KEYGEN_QUEUE,
        handlers,
        keygen.probe,
        RequestAuditor(audit_log, clock=clock),
        await _quotas(settings, KEYGEN_QUEUE, stack, metrics),
        # Issue 17: a TPM outage is answered tpm_unavailable at once (retryable), never
        # waited out with consuming paused; requests that need no TPM are still served.
        waits_for=(VaultUnavailable,),
    )


async def _quotas(
    settings: Settings, queue: str, stack: AsyncExitStack, metrics: Metrics | None
) -> Quotas | None:
    """The worker's quotas, kept shared by the queue's consumers; None if they are off."""
    quotas = Quotas.from_settings(settings, metrics=metrics)
    if quotas is not None:
        await _beside(stack, partial(follow_consumers, quotas, settings.amqp_url, queue))
    return quotas


def _keyed_audit_log(
    store: VaultStore, ring: KekRing, stack: AsyncExitStack, metrics: Metrics | None
) -> AuditLog:
    """The worker's audit log, linked under the ring's audit key; its newest entry a metric."""
    on_head = None if metrics is None else (lambda head: metrics.audit_head(head.seq))
    audit_log = AuditLog(KeyedAppender(store, ChainKeys(ring), on_head=on_head))
    stack.push_async_callback(audit_log.close)
    return audit_log


async def _beside(
    stack: AsyncExitStack,
    run: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    ready: asyncio.Event | None = None,
) -> None:
    """Run ``run(stop)`` as a task until the stack closes; wait for ``ready`` if given."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(stop))

    async def finish() -> None:
        stop.set()
        await task

    stack.push_async_callback(finish)
    if ready is not None:
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if task.done():
            task.result()  # it failed to start: its error says why


def _metrics(settings: Settings, stack: AsyncExitStack, role: str) -> Metrics:
    metrics = Metrics(role=role)
    if settings.metrics_port is not None:
        server = metrics.serve(settings.metrics_port, settings.metrics_host)
        stack.callback(server.close)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, server.port)
    return metrics


async def _serve(settings: Settings, worker: Worker, prefetch: int, metrics: Metrics) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runtime = build_runtime(settings, worker, prefetch=prefetch, metrics=metrics)
    await runtime.run(stop)


def node_urls(settings: Settings) -> tuple[str, ...]:
    """One URL per broker node, where new sign shards are declared in turn (their leaders
    live where they were declared): the broker URL's nodes."""
    return single_urls(settings.amqp_url)


def build_runtime(
    settings: Settings,
    worker: Worker,
    *,
    prefetch: int,
    metrics: Metrics,
    name: str | None = None,
    handlers: Mapping[Operation, Handler] | None = None,
) -> ConsumerRuntime:
    """The consumer runtime for ``worker``, wired as every worker runs it (and the test fleet).

    Its probe, audit hook, admission, metrics and backoff come from ``worker`` and
    ``settings``; ``name`` (the connection name) and ``handlers`` (wrapped, say, to count what
    each worker served) may be overridden.
    """
    name = name or "zandd-" + worker.queue.removeprefix("zandd.")
    return ConsumerRuntime(
        queue=worker.queue,
        handlers=worker.handlers if handlers is None else handlers,
        prefetch=prefetch,
        limits=settings.limits,
        drain_timeout_s=settings.drain_timeout_s,
        max_backoff_s=settings.max_backoff_s,
        name=name,
        probe=worker.probe,
        audit=worker.audit,
        metrics=metrics,
        admission=worker.admission,
        waits_for=worker.waits_for,
        connect=transport_connect(
            settings.transport,
            settings.amqp_url,
            name=name,
            max_body_bytes=settings.limits.max_body_bytes,
        ),
        resolve_queue=topology_queue(
            settings.amqp_url,
            worker.queue,
            name=name,
            declare=settings.declare_topology,
            sign_shards=settings.sign_shards if worker.queue == SIGN_QUEUE else None,
            node_urls=node_urls(settings),
        ),
    )


def _harden(settings: Settings) -> None:
    # Before the first request, so before any scalar is opened; after start-up, which may fail
    # with a one-sentence error of its own.
    protections = harden_process(lock_memory=settings.lock_memory)
    log.info("memory protections: %s", protections.describe())


async def _open_vault(
    settings: Settings, ring: KekRing, stack: AsyncExitStack, metrics: Metrics
) -> VaultStore:
    """Open the vault, refuse a ring that cannot open all of it, and keep checking that."""
    store = await open_store(settings.resolved_vault_url)
    stack.push_async_callback(store.close)
    watch = RingWatch(store, ring, metrics)
    coverage = await watch.check()
    accept(coverage, settings)
    await _beside(stack, watch.run)
    return store


async def serve_signer(settings: Settings, *, concurrency: int | None = None) -> None:
    """Serve ``zandd.sign`` until SIGTERM/SIGINT, then drain."""
    ring = load_ring(settings)
    async with AsyncExitStack() as stack:
        metrics = _metrics(settings, stack, "signer")
        store = await _open_vault(settings, ring, stack, metrics)
        worker = await signer_worker(settings, store, ring, stack, metrics=metrics)
        log.info("%s", describe(ring, settings))
        _harden(settings)
        await _serve(settings, worker, concurrency or settings.signer_concurrency, metrics)


async def serve_keygen(settings: Settings) -> None:
    """Serve ``zandd.keygen`` until SIGTERM/SIGINT, then drain. Needs the TPM."""
    from workers.keygen.session import TpmSession

    ring = load_ring(settings)
    async with AsyncExitStack() as stack:
        # Opened on first use: a hot standby leaves the TPM to the active keygen worker.
        tpm = TpmSession(resolve_tcti(settings))
        stack.callback(tpm.close)
        log.info("keygen will use the TPM at %s", tpm.tcti)
        metrics = _metrics(settings, stack, "keygen")
        store = await _open_vault(settings, ring, stack, metrics)
        worker = await keygen_worker(settings, store, ring, tpm, stack, metrics=metrics)
        log.info("%s", describe(ring, settings))
        _harden(settings)
        await _serve(settings, worker, settings.keygen_concurrency, metrics)
