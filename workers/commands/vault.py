"""The key vault: ``zandd vault init|rotate-kek|rewrap|status|seal-ring|export-ring|mac-records``.

Retiring a KEK: ``rotate-kek`` adds a new active KEK (running workers pick it up by
themselves; under ``zandd up`` the supervisor replaces them with ones that have it),
``rewrap`` re-seals and re-MACs every key version under it — interruptible, re-runnable — and
``status`` shows when no version uses the old KEK any more. ``mac-records`` is the one-time
upgrade of a vault whose records predate record MACs.

The ring file is sealed to this host's TPM when it has one; ``seal-ring`` seals a plaintext
ring and ``export-ring`` writes a sealed one back in plaintext (for a host without a TPM).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import ExitStack
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from contracts.errors import ConfigurationError, ErrorCode, ZanddError
from contracts.urls import redact_url
from vault.audit import OUTCOME_OK, AuditEvent, AuditLog
from vault.audit_chain import ChainKeys
from vault.coverage import ALLOW_UNREADABLE_FLAG
from vault.records import KeyRecord
from workers.audit.audit_head import KeyedAppender
from workers.audit.auditing import utc_now
from workers.commands.base import EXIT_FAILURE, VAULT, CommandTree
from workers.commands.local import local_principal, opened_store
from workers.commands.progress import ProgressBar
from workers.service.config import Settings
from workers.service.hygiene import harden_for_key_material

if TYPE_CHECKING:
    from vault.kek import KekRing
    from workers.keygen.tpm import Tpm

log = logging.getLogger("zandd.cli")

_Outcome_co = TypeVar("_Outcome_co", bound=StrEnum, covariant=True)
_Outcome = TypeVar("_Outcome", bound=StrEnum)


async def _cmd_vault_init(args: argparse.Namespace, settings: Settings) -> int:
    from vault.kek import KekRing
    from workers.service.ringsetup import describe, open_or_create_ring, tpm_sealer

    harden_for_key_material(lock_memory=settings.lock_memory)
    updates: dict[str, object] = {"allow_unreadable": True} if args.allow_unreadable else {}
    if args.pcrs:
        updates["kek_ring_pcrs"] = args.pcrs
    settings = settings.model_copy(update=updates)
    source = ""

    def create(path: Path) -> KekRing:
        nonlocal source
        with ExitStack() as stack:
            tpm = _reachable_tpm(settings)
            if tpm is None:
                if not args.plaintext:
                    raise ConfigurationError(
                        f"no TPM is reachable to seal the KEK ring {path} to: start one (or set "
                        "ZANDD_TPM_TCTI), or pass --plaintext to write the ring in the clear"
                    )
                source = "the OS RNG (no TPM reachable)"
                return KekRing.create(path)
            stack.enter_context(tpm)
            source = "the TPM's RNG mixed with the OS RNG"
            sealer = None
            if not args.plaintext:
                sealer = tpm_sealer(settings, pcrs=settings.kek_ring_pcrs)
            return KekRing.create(path, random_bytes=tpm.get_random, sealer=sealer)

    path = settings.resolved_kek_file
    ring, created = await open_or_create_ring(settings, create)
    if created:
        print(f"created KEK ring {path} (active KEK {ring.active.kek_id}, from {source})")
    else:
        print(f"KEK ring {path} exists already; kept as it is")
    print(describe(ring, settings))
    print(f"vault ready at {redact_url(settings.resolved_vault_url)}")
    return 0


async def _cmd_vault_rotate_kek(args: argparse.Namespace, settings: Settings) -> int:
    from workers.service.ringsetup import load_ring

    path = settings.resolved_kek_file
    harden_for_key_material(lock_memory=settings.lock_memory)
    old = load_ring(settings)
    ring = old.rotate(path)
    async with opened_store(settings) as store:
        audit = AuditLog(KeyedAppender(store, ChainKeys(ring)))
        await audit.record(_vault_event("vault.rotate-kek", key_id=ring.active.kek_id))
    print(f"new active KEK {ring.active.kek_id} (previous {old.active.kek_id}, kept in the ring)")
    print("running workers use it from their next key on; `zandd vault rewrap` moves the rest")
    return 0


async def _cmd_vault_seal_ring(args: argparse.Namespace, settings: Settings) -> int:
    from workers.service.ringsetup import describe, load_ring, tpm_sealer

    harden_for_key_material(lock_memory=settings.lock_memory)
    ring = load_ring(settings)
    if ring.sealer is not None:
        print(f"{describe(ring, settings)}: nothing to do")
        return 0
    sealer = tpm_sealer(settings, pcrs=args.pcrs or settings.kek_ring_pcrs)
    sealed = ring.rewrite(settings.resolved_kek_file, sealer=sealer)
    await _record_ring_event("vault.seal-ring", sealed, settings)
    print(describe(sealed, settings))
    print("copies of the plaintext file (backups, other hosts) still hold every KEK")
    return 0


async def _cmd_vault_export_ring(args: argparse.Namespace, settings: Settings) -> int:
    from workers.service.ringsetup import describe, load_ring

    harden_for_key_material(lock_memory=settings.lock_memory)
    ring = load_ring(settings)
    if ring.sealer is None:
        print(f"{describe(ring, settings)}: nothing to do")
        return 0
    plain = ring.rewrite(settings.resolved_kek_file, sealer=None)
    await _record_ring_event("vault.export-ring", plain, settings)
    print(
        f"WARNING: the KEK ring {settings.resolved_kek_file} is now in PLAINTEXT: whoever "
        "copies it and the vault has every key; keep it mode 0600, off backups, and delete "
        "it once it reached the host that needs it",
        file=sys.stderr,
    )
    print(describe(plain, settings))
    return 0


async def _record_ring_event(operation: str, ring: KekRing, settings: Settings) -> None:
    async with opened_store(settings) as store:
        audit = AuditLog(KeyedAppender(store, ChainKeys(ring)))
        await audit.record(_vault_event(operation, key_id=ring.active.kek_id))


async def _cmd_vault_rewrap(args: argparse.Namespace, settings: Settings) -> int:
    from vault.rewrap import RewrapOutcome, rewrap
    from workers.service.ringsetup import load_ring

    harden_for_key_material(lock_memory=settings.lock_memory)
    ring = load_ring(settings)
    async with opened_store(settings) as store:
        audit = AuditLog(KeyedAppender(store, ChainKeys(ring)))
        outcomes = await _each_version(
            "vault.rewrap", rewrap(store, ring), audit, RewrapOutcome.REWRAPPED
        )
        # issue 15, aliases: their MACs move to the active KEK too.
        from vault.aliases import rewrap_aliases

        aliases = await rewrap_aliases(store, ring)
    summary = ", ".join(f"{count} {outcome.value}" for outcome, count in sorted(outcomes.items()))
    print(f"rewrap under {ring.active.kek_id}: {summary or 'no key versions'}")
    if aliases:
        print("aliases: " + ", ".join(f"{n} {what}" for what, n in sorted(aliases.items())))
    if aliases["integrity_error"]:
        print("some aliases fail their MAC (integrity_error): set them again", file=sys.stderr)
        return EXIT_FAILURE
    if outcomes[RewrapOutcome.UNREADABLE]:
        print(
            "some versions do not open (integrity_error): see `zandd audit tail`",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if outcomes[RewrapOutcome.CHANGED]:
        print("some versions changed while re-wrapping: run `zandd vault rewrap` again")
    return 0


async def _cmd_vault_mac_records(args: argparse.Namespace, settings: Settings) -> int:
    from vault.mac_upgrade import MacOutcome, count_unmaced, mac_records
    from workers.service.ringsetup import load_ring

    harden_for_key_material(lock_memory=settings.lock_memory)
    ring = load_ring(settings)
    async with opened_store(settings) as store:
        maced, unmaced = await count_unmaced(store)
        if maced and unmaced and not args.again:
            print(
                f"zandd: {unmaced} key versions have no MAC in a vault where {maced} have one: "
                "in an upgraded vault such a record was written without the KEK ring; "
                "pass --again only to finish an interrupted upgrade",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        audit = AuditLog(KeyedAppender(store, ChainKeys(ring)))
        outcomes = await _each_version(
            "vault.mac-records", mac_records(store, ring), audit, MacOutcome.MACED
        )
    summary = ", ".join(f"{count} {outcome.value}" for outcome, count in sorted(outcomes.items()))
    print(f"record MACs under {ring.active.kek_id}: {summary or 'no key versions'}")
    if outcomes[MacOutcome.UNREADABLE]:
        print(
            "some versions do not open or do not match their public key: left without a MAC "
            "(refused by every worker); see `zandd audit tail`",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if outcomes[MacOutcome.CHANGED]:
        print("some versions changed meanwhile: run `zandd vault mac-records --again`")
    return 0


class _Step(Protocol[_Outcome_co]):
    """One key version handled by a vault-wide walk (rewrap, mac-records): ``done`` of ``total``."""

    @property
    def done(self) -> int: ...
    @property
    def total(self) -> int: ...
    @property
    def record(self) -> KeyRecord: ...
    @property
    def outcome(self) -> _Outcome_co: ...


async def _each_version(
    operation: str, steps: AsyncIterator[_Step[_Outcome]], audit: AuditLog, done: _Outcome
) -> Counter[_Outcome]:
    """Run a vault-wide walk with a progress bar; audit each version it changed or could not
    open (outcome ``integrity_error``). The count of each outcome."""
    outcomes: Counter[_Outcome] = Counter()
    bar = ProgressBar(sys.stderr)
    async for step in steps:
        outcomes[step.outcome] += 1
        bar.show(operation.removeprefix("vault."), step.done, step.total)
        if step.outcome == done or step.outcome == ErrorCode.INTEGRITY_ERROR:
            outcome = OUTCOME_OK if step.outcome == done else str(step.outcome)
            event = _vault_event(
                operation, key_id=step.record.key_id, version=step.record.version, outcome=outcome
            )
            await audit.record(event)
    bar.finish()
    return outcomes


async def _cmd_vault_status(args: argparse.Namespace, settings: Settings) -> int:
    from vault.kek import ring_file_info

    path = settings.resolved_kek_file
    # The ids and the form are readable without opening the ring: no TPM needed.
    ring = ring_file_info(path)
    async with opened_store(settings) as store:
        records = await store.list_versions()
    # A key of protection "tpm" has nothing sealed: the TPM holds it, no KEK.
    tpm_bound = sum(1 for record in records if record.tpm_blob is not None)
    per_kek = Counter(record.kek_id for record in records if record.tpm_blob is None)
    destroyed = per_kek.pop(None, 0)
    print(f"vault {redact_url(settings.resolved_vault_url)}: {len(records)} key versions")
    if ring.sealed:
        policy = f"PCR policy {ring.pcrs}" if ring.pcrs else "no PCR policy"
        print(f"KEK ring {path}: sealed to this host's TPM ({policy})")
    else:
        print(f"KEK ring {path}: PLAINTEXT, not sealed to a TPM (`zandd vault seal-ring` seals it)")
    # A KEK that only derives some record's MAC key is still in use: re-wrap moves those too.
    macs = Counter(record.mac.kek_id for record in records if record.mac is not None)
    unmaced = len(records) - macs.total()
    for kek_id in ring.kek_ids:
        active = " (active)" if kek_id == ring.active else ""
        count, mac_count = per_kek.pop(kek_id, 0), macs.pop(kek_id, 0)
        retire = "" if count or mac_count or active else " — unused: it can be retired"
        also = f" (and {mac_count} record MACs)" if mac_count > count else ""
        print(f"  KEK {kek_id}{active}: {count} key versions{also}{retire}")
    for unknown, count in (per_kek + macs).items():
        print(f"  KEK {unknown} (NOT IN THE RING): {count} key versions cannot be opened")
    print(f"  destroyed (nothing sealed): {destroyed} key versions")
    if tpm_bound:
        print(f"  held by the TPM (protection tpm, no KEK): {tpm_bound} key versions")
    if unmaced:
        print(f"  without a record MAC (refused): {unmaced} key versions")
    return EXIT_FAILURE if per_kek or macs else 0


def _vault_event(
    operation: str,
    *,
    key_id: str,
    version: int | None = None,
    outcome: str = OUTCOME_OK,
) -> AuditEvent:
    return AuditEvent(
        at=utc_now(),
        principal=local_principal(),
        operation=operation,
        outcome=outcome,
        key_id=key_id,
        version=version,
    )


def _reachable_tpm(settings: Settings) -> Tpm | None:
    try:
        from workers.keygen.tpm import Tpm
        from workers.service.serve import resolve_tcti

        return Tpm(resolve_tcti(settings))
    except (ImportError, ZanddError) as exc:
        log.debug("no TPM for the KEK ring: %s", exc)
        return None


_PCRS_HELP = (
    "seal with a PCR policy: the ring then opens only while these PCRs (e.g. sha256:0,2,4,7) "
    "hold the values they had at sealing (real TPMs; default: no policy, ZANDD_KEK_RING_PCRS)"
)


def register(tree: CommandTree) -> None:
    """Add the vault commands."""
    init = tree.add(
        "vault init",
        _cmd_vault_init,
        "create the KEK ring (from the TPM's RNG) and the vault",
        settings=VAULT,
    )
    init.add_argument(
        "--plaintext",
        action="store_true",
        help="write the ring in the clear, not sealed to the TPM (hosts without a TPM, "
        "compose secrets)",
    )
    init.add_argument("--pcrs", default=None, help=_PCRS_HELP)
    init.add_argument(
        ALLOW_UNREADABLE_FLAG,
        action="store_true",
        help="create a new ring even though the vault holds key versions it will not open "
        "(they stay unreadable; health fails until they are gone)",
    )
    tree.add(
        "vault rotate-kek",
        _cmd_vault_rotate_kek,
        "add a new active KEK to the ring",
        settings=VAULT,
    )
    tree.add(
        "vault rewrap",
        _cmd_vault_rewrap,
        "re-seal every key version under the active KEK (safe to interrupt and re-run)",
        settings=VAULT,
    )
    tree.add(
        "vault status",
        _cmd_vault_status,
        "key versions per KEK, KEKs nothing uses, and whether the ring is sealed",
        settings=VAULT,
    )
    seal = tree.add(
        "vault seal-ring",
        _cmd_vault_seal_ring,
        "seal a plaintext KEK ring to this host's TPM",
        settings=VAULT,
    )
    seal.add_argument("--pcrs", default=None, help=_PCRS_HELP)
    tree.add(
        "vault export-ring",
        _cmd_vault_export_ring,
        "write a sealed KEK ring back in PLAINTEXT (for a host without a TPM)",
        settings=VAULT,
    )
    upgrade = tree.add(
        "vault mac-records",
        _cmd_vault_mac_records,
        "one-time upgrade: MAC every key version of a vault from before record MACs, "
        "trusting the rows as they are now",
        settings=VAULT,
    )
    upgrade.add_argument(
        "--again", action="store_true", help="finish an interrupted run (some versions have MACs)"
    )
