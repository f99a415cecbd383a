"""Where the benchmark runs: a vhost of its own, a scratch data dir, a TPM, fleets of N signers.

Nothing a running fleet uses is touched: the bench fleet lives in a vhost created for the run
(never ``/``), keeps its vault and KEK ring in a temporary directory, and gets a swtpm of its
own. A simulator has no resource manager, so sharing a production swtpm would share its three
transient object slots with the production keygen worker; a TPM device behind the kernel's
resource manager can be shared.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from yarl import URL

from contracts.amqp import connect, principal_of
from contracts.brokers import brokers
from contracts.errors import BrokerUnavailable, ConfigurationError, ZanddError
from contracts.topology import KEYGEN_QUEUE, SIGN_QUEUE, consumer_count
from contracts.urls import redact_url
from vault.kek import KekRing
from workers.bench.progress import Progress
from workers.operator.fleet import READY_TIMEOUT_S, Fleet, child_environment, wait_until_ready
from workers.service.config import Settings

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
_RABBITMQCTL_TIMEOUT_S = 60.0
_DELETE_ATTEMPTS = 5
_DELETE_RETRY_S = 3.0
#: The bench fleet has nothing in flight when it is stopped: no reason to wait long.
_DRAIN_TIMEOUT_S = 2.0


async def _rabbitmqctl(*args: str) -> None:
    try:
        process = await asyncio.create_subprocess_exec(
            "rabbitmqctl",
            "-q",
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        raise ConfigurationError("rabbitmqctl is not installed") from None
    try:
        async with asyncio.timeout(_RABBITMQCTL_TIMEOUT_S):
            _, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ConfigurationError(f"rabbitmqctl {args[0]} did not finish in time") from None
    if process.returncode != 0:
        lines = stderr.decode(errors="replace").strip().splitlines() or ["no output"]
        # rabbitmqctl follows its error line with the command's usage text.
        reason = next((line for line in lines if line.startswith("Error")), lines[0])
        raise ConfigurationError(f"rabbitmqctl {args[0]} failed: {reason}")


def require_local_broker(amqp_url: str) -> None:
    """Refuse a broker elsewhere: the run's vhost is made with rabbitmqctl on this machine.

    And refuse several brokers (a cluster): rabbitmqctl reaches this machine's one node.
    """
    found = brokers(amqp_url)
    if len(found) > 1:
        raise ConfigurationError(
            f"the benchmark starts its own fleet on this machine's one broker, but "
            f"{redact_url(amqp_url)} names {len(found)}: measure a fleet running on a cluster "
            "with --attach"
        )
    if found[0].host not in _LOOPBACK_HOSTS:
        raise ConfigurationError(
            "the benchmark starts its own fleet in a vhost it creates with rabbitmqctl on this "
            f"machine, but the broker at {redact_url(amqp_url)} is not local: measure a fleet "
            "running there with --attach"
        )


@asynccontextmanager
async def private_vhost(amqp_url: str, progress: Progress) -> AsyncIterator[str]:
    """A vhost for this run on the local broker, deleted afterwards; yields its AMQP URL."""
    require_local_broker(amqp_url)
    url = URL(amqp_url)
    vhost = f"zandd-bench-{uuid.uuid4().hex[:12]}"
    await _rabbitmqctl("add_vhost", vhost)
    try:
        await _rabbitmqctl("set_permissions", "-p", vhost, principal_of(amqp_url), ".*", ".*", ".*")
        progress.note(f"created the vhost {vhost} for this run")
        yield str(url.with_path("/" + vhost))
    finally:
        await _delete_vhost(vhost, progress)


async def _delete_vhost(vhost: str, progress: Progress) -> None:
    # A broker restarting its app (another suite's outage test on a shared broker) refuses
    # rabbitmqctl for a few seconds: try again before leaving the vhost behind.
    for attempt in range(1, _DELETE_ATTEMPTS + 1):
        try:
            await _rabbitmqctl("delete_vhost", vhost)
            return
        except ConfigurationError as exc:
            if attempt == _DELETE_ATTEMPTS:
                progress.note(f"could not delete the vhost {vhost}: {exc.message}")
                return
        await asyncio.sleep(_DELETE_RETRY_S)


@contextmanager
def bench_tpm(settings: Settings, state_dir: Path) -> Iterator[str]:
    """The TCTI of a TPM this run may use: the host's device, else a swtpm of its own."""
    from workers.keygen.swtpm import start_swtpm
    from workers.keygen.tpm import default_tcti

    configured = settings.tpm_tcti or ""
    device = configured if configured.startswith("device:") else default_tcti()
    if device:
        yield device
        return
    swtpm = start_swtpm(state_dir, port=None)
    try:
        yield swtpm.tcti
    finally:
        swtpm.stop()


def bench_settings(settings: Settings, *, amqp_url: str, data_dir: Path, tcti: str) -> Settings:
    """The settings of the bench fleet: its vhost, its scratch data dir, its TPM, quiet logs."""
    # The workers' INFO lines would bury the progress; DEBUG is passed on when asked for.
    level = settings.log_level.upper()
    return settings.model_copy(
        update={
            "amqp_url": amqp_url,
            "data_dir": data_dir,
            "vault_url": None,
            "kek_file": None,
            "tpm_tcti": tcti,
            "log_level": "WARNING" if level == "INFO" else level,
            "drain_timeout_s": _DRAIN_TIMEOUT_S,
            "metrics_port": None,
            # It measures what the fleet can do, not an operator's quota.
            "quota_requests_per_s": None,
            "quota_signatures_per_s": None,
            "quota_overrides": {},
        }
    )


@asynccontextmanager
async def running_fleet(
    settings: Settings, tcti: str, signers: int, progress: Progress, ring: KekRing
) -> AsyncIterator[Fleet]:
    """The keygen worker and ``signers`` signers as child processes, until the block ends;
    they get ``ring`` on a pipe, as under ``zandd up``."""
    env = child_environment(settings, tcti)
    # A metrics port from the environment belongs to the production fleet: do not fight it.
    env.pop("ZANDD_METRICS_PORT", None)
    fleet = Fleet(settings, signers=signers, child_env=env, ring=ring)
    progress.note(f"starting a fleet: keygen + {signers} signer{'s' if signers > 1 else ''}")
    await fleet.start()
    try:
        try:
            await wait_until_ready(settings.amqp_url, signers)
        except TimeoutError:
            raise ZanddError(
                f"the bench fleet was not ready within {READY_TIMEOUT_S:.0f} s: "
                f"{fleet.describe_failures()}"
            ) from None
        yield fleet
    finally:
        await fleet.stop()


async def attached_signers(amqp_url: str) -> int:
    """How many signers the running fleet at ``amqp_url`` has; refuses a fleet that is not there."""
    connection = await connect(amqp_url, connection_name="zandd-bench")
    async with connection:
        counts: dict[str, int] = {}
        for name in (SIGN_QUEUE, KEYGEN_QUEUE):
            try:
                counts[name] = await consumer_count(connection, name)
            except BrokerUnavailable:  # QueueMissing too: no fleet has declared it
                counts[name] = 0
    if not counts[SIGN_QUEUE] or not counts[KEYGEN_QUEUE]:
        raise ZanddError(
            f"no running fleet at {redact_url(amqp_url)} ({counts[SIGN_QUEUE]} signers, "
            f"{counts[KEYGEN_QUEUE]} keygen workers): start one with `zandd up`, or run "
            "`zandd bench` without --attach to start its own"
        )
    return counts[SIGN_QUEUE]
