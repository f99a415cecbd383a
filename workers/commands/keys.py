"""Key lifecycle from a shell: ``zandd keys disable|enable|destroy|cancel-destroy|show|list``.

The lifecycle commands go through the fleet like any producer (the keygen worker checks that
the caller owns the key or is an admin, and audits it). ``show`` and ``list`` read the vault
directly: they are for an operator on a host that can open it, and show no key material. With
the KEK ring at hand they check each record's MAC and mark the ones the workers refuse: what
the vault says of an owner or a signer means nothing when its MAC fails. With
``--via-broker`` they ask the fleet instead (``key.describe``, ``key.list``), as a producer
with no access to the vault does: the signers check the MACs and show only what the caller
may see.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from contracts.errors import IntegrityError, KeyNotFound, ZanddError
from contracts.models import DEFAULT_PENDING_DAYS, KeyState, KeyStateReply
from workers.commands.base import VAULT, Command, CommandTree
from workers.commands.jsonout import add_json_flag, dumps
from workers.commands.local import opened_store, printable, when
from workers.service.config import Settings

if TYPE_CHECKING:
    from contracts.client import SigningClient
    from vault.records import KeyRecord

LifecycleCall = Callable[["SigningClient", argparse.Namespace], Awaitable[KeyStateReply]]


def _lifecycle(call: LifecycleCall) -> Command:
    async def command(args: argparse.Namespace, settings: Settings) -> int:
        from contracts.client import SigningClient

        async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
            reply = await call(client, args)
        for version in reply.versions:
            line = f"{reply.key_id} v{version.version}: {version.state.value}"
            if version.state == KeyState.PENDING_DESTRUCTION:
                line += f" (destroyed after {when(version.destroy_after)})"
            print(line)
        return 0

    return command


RecordCheck = Callable[["KeyRecord"], str]


def _describe_version(record: KeyRecord, check: RecordCheck) -> str:
    if record.state == KeyState.DESTROYED:
        line = f"v{record.version}: destroyed (due {when(record.destroy_after)})"
    elif record.tpm_blob is not None:
        line = f"v{record.version}: {record.state.value}, protection tpm (held by the TPM)"
    else:
        line = f"v{record.version}: {record.state.value}, sealed with KEK {record.kek_id}"
    if record.state == KeyState.PENDING_DESTRUCTION:
        line += f", destroyed after {when(record.destroy_after)}"
    return line + check(record)


def _record_check(settings: Settings) -> RecordCheck:
    """A suffix for each record: empty when its MAC holds, why the workers refuse it if not."""
    from vault.record_mac import verify_record
    from workers.service.hygiene import harden_for_key_material
    from workers.service.ringsetup import load_ring

    try:
        harden_for_key_material(lock_memory=settings.lock_memory)
        ring = load_ring(settings)
    except ZanddError:
        return lambda record: " (record MAC not checked: no KEK ring here)"

    def check(record: KeyRecord) -> str:
        try:
            verify_record(record, ring)
        except IntegrityError as exc:
            return f" — REFUSED BY THE WORKERS: {exc.message}"
        return ""

    return check


async def _cmd_keys_show(args: argparse.Namespace, settings: Settings) -> int:
    if args.via_broker:
        return await _show_via_broker(args, settings)
    async with opened_store(settings) as store:
        versions = await store.list_versions(args.key_id)
    if not versions:
        raise KeyNotFound(f"key {args.key_id} not found")
    first, latest = versions[0], versions[-1]
    check = _record_check(settings)
    if args.json:
        print(dumps(_key_document(versions, check)))
        return 0
    print(f"key {latest.key_id}")
    print(f"  label:           {printable(latest.label)}")
    print(f"  algorithm:       {latest.algorithm}")
    print(f"  owner:           {printable(first.owner)}")
    print(f"  allowed signers: {', '.join(printable(s) for s in latest.allowed_signers)}")
    print(f"  created:         {when(first.created_at)}")
    # issue 15, key writes: the primary version (the highest) and the rotation schedule.
    from workers.commands.versions import describe_period

    print(f"  primary version: v{latest.version}")
    print(f"  rotation period: {describe_period(latest.rotation_period_s)}")
    if latest.next_rotation_at is not None:
        print(f"  next rotation:   {when(latest.next_rotation_at)}")
    for record in versions:
        print(f"  {_describe_version(record, check)}")
    return 0


async def _cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    if args.via_broker:
        return await _list_via_broker(args, settings)
    if args.scope is not None:
        raise ZanddError("--scope needs --via-broker (the vault lists every key)")
    async with opened_store(settings) as store:
        records = await store.list_keys()
    records = [
        r
        for r in records
        if (args.label is None or r.label == args.label)
        and (args.state is None or r.state.value == args.state)
    ]
    check = _record_check(settings)
    if args.json:
        print(dumps([_listed(record, check) for record in records]))
        return 0
    print(f"{'KEY':<24} {'VERSION':>7}  {'STATE':<20} {'OWNER':<20} LABEL")
    for record in records:
        print(
            f"{record.key_id:<24} {record.version:>7}  {record.state.value:<20} "
            f"{printable(record.owner):<20} {printable(record.label)}{check(record)}"
        )
    return 0


def _listed(record: KeyRecord, check: RecordCheck) -> dict[str, object]:
    """A key's latest version as ``keys list --json`` shows it."""
    refused = check(record)
    return {
        "key_id": record.key_id,
        "version": record.version,
        "state": record.state,
        "owner": record.owner,
        "label": record.label,
        # "" when the record's MAC holds; else why the workers refuse it (or why unchecked).
        "record_check": refused.strip(" —") or "ok",
    }


def _key_document(versions: list[KeyRecord], check: RecordCheck) -> dict[str, object]:
    """A key and its versions as ``keys show --json`` shows it."""
    first, latest = versions[0], versions[-1]
    return {
        "key_id": latest.key_id,
        "label": latest.label,
        "algorithm": latest.algorithm,
        "owner": first.owner,
        "allowed_signers": list(latest.allowed_signers),
        "created_at": first.created_at,
        "primary_version": latest.version,
        "rotation_period_s": latest.rotation_period_s,
        "next_rotation_at": latest.next_rotation_at,
        "versions": [
            {
                "version": record.version,
                "state": record.state,
                "destroy_after": record.destroy_after,
                "record_check": check(record).strip(" —") or "ok",
            }
            for record in versions
        ],
    }


# -- issue 15, reads: keys show / keys list over the wire (key.describe, key.list) ----------


async def _show_via_broker(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.client import SigningClient

    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        reply = await client.describe_key(args.key_id)
    if args.json:
        print(dumps(reply.model_dump(mode="json")))
        return 0
    current = reply.versions[-1]
    print(f"key {reply.key_id} (current version {reply.current_version})")
    print(f"  label:           {printable(current.label)}")
    print(f"  algorithm:       {current.algorithm}")
    print(f"  owner:           {_shown(reply.owner)}")
    signers = (
        None if reply.allowed_signers is None else ", ".join(map(printable, reply.allowed_signers))
    )
    print(f"  allowed signers: {_shown(signers)}")
    print(f"  created:         {when(reply.versions[0].created_at)}")
    for version in reply.versions:
        line = f"v{version.version}: {version.state.value}, protection {version.protection}"
        if version.destroy_after is not None:
            line += f", destroyed after {when(version.destroy_after)}"
        print(f"  {line}")
        if args.public_keys:
            print(version.public_key_pem, end="")
    return 0


async def _list_via_broker(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.client import SigningClient

    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        keys = [
            key
            async for key in client.iter_keys(
                args.scope or "owned",
                label=args.label,
                state=args.state,
                page_size=args.page_size,
            )
        ]
    if args.json:
        print(dumps([key.model_dump(mode="json") for key in keys]))
        return 0
    print(f"{'KEY':<24} {'VERSION':>7}  {'STATE':<20} {'OWNER':<20} LABEL")
    for key in keys:
        print(
            f"{key.key_id:<24} {key.version:>7}  {key.state.value:<20} "
            f"{_shown(key.owner):<20} {printable(key.label)}"
        )
    return 0


def _shown(value: str | None) -> str:
    """What the fleet showed, or a dash where it shows it only to the owner and admins."""
    return "-" if value is None else printable(value)


def _add_read_arguments(show: argparse.ArgumentParser, listing: argparse.ArgumentParser) -> None:
    from contracts.models import DEFAULT_LIST_PAGE_SIZE, MAX_LIST_PAGE_SIZE

    for parser in (show, listing):
        add_json_flag(parser)
        parser.add_argument(
            "--via-broker",
            action="store_true",
            help="ask the fleet (key.describe / key.list) instead of reading the vault: for "
            "producers with no vault access; shows only what the caller may see",
        )
    show.add_argument(
        "--public-keys", action="store_true", help="with --via-broker: print each version's PEM"
    )
    listing.add_argument(
        "--scope",
        choices=("owned", "signable", "all"),
        default=None,
        help="with --via-broker: your keys (default), those you may sign with, or all (admins)",
    )
    listing.add_argument("--label", default=None, help="only keys with exactly this label")
    listing.add_argument(
        "--state",
        choices=[state.value for state in KeyState],
        default=None,
        help="only keys whose current version is in this state",
    )
    listing.add_argument(
        "--page-size",
        type=int,
        default=DEFAULT_LIST_PAGE_SIZE,
        help=f"with --via-broker: keys per request (1-{MAX_LIST_PAGE_SIZE})",
    )


# -- end issue 15, reads --------------------------------------------------------------------


async def _cmd_keys_attest(args: argparse.Namespace, settings: Settings) -> int:
    """Check the TPM's attestation of a key's public key, as the fleet serves it."""
    import sys

    from contracts.attestation import parts_of, verify_attestation
    from contracts.client import SigningClient
    from contracts.crypto import load_algorithm_public_key, load_public_key

    attestation_key = load_public_key(args.attestation_key.read_bytes())
    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        reply = await client.public_key(args.key_id, args.version)
    name = f"{reply.key_id} v{reply.version}"
    if reply.attestation is None:
        print(f"{name}: attestation FAILED: the fleet has no attestation for it", file=sys.stderr)
        return 1
    try:
        report = verify_attestation(
            parts_of(reply.attestation),
            load_algorithm_public_key(reply.public_key_pem, reply.algorithm),
            attestation_key,
            key_id=reply.key_id,
            version=reply.version,
        )
    except IntegrityError as exc:
        print(f"{name}: attestation FAILED: {exc.message}", file=sys.stderr)
        return 1
    print(f"{name}: {report.describe()}")
    return 0


def register(tree: CommandTree) -> None:
    """Add the key lifecycle commands (``keys create``/``public`` live with the client)."""
    lifecycle: list[tuple[str, LifecycleCall, str]] = [
        (
            "disable",
            lambda c, a: c.disable_key(a.key_id, a.version),
            "refuse all signing with a key until it is enabled again",
        ),
        ("enable", lambda c, a: c.enable_key(a.key_id, a.version), "allow a disabled key again"),
        (
            "destroy",
            lambda c, a: c.destroy_key(a.key_id, a.version, pending_days=a.pending_days),
            "stop signing now and erase the key after a waiting period",
        ),
        (
            "cancel-destroy",
            lambda c, a: c.cancel_key_destruction(a.key_id, a.version),
            "call off a scheduled destruction (the key comes back disabled)",
        ),
    ]
    for name, call, help_text in lifecycle:
        parser = tree.add(f"keys {name}", _lifecycle(call), help_text, client=True)
        parser.add_argument("key_id")
        parser.add_argument(
            "--version", type=int, default=None, help="one version (default: all live ones)"
        )
        if name == "destroy":
            parser.add_argument(
                "--pending-days",
                type=int,
                default=DEFAULT_PENDING_DAYS,
                help=f"waiting period before the key is erased (default {DEFAULT_PENDING_DAYS})",
            )
    show = tree.add(
        "keys show",
        _cmd_keys_show,
        "show a key's owner, signers and versions",
        client=True,
        settings=VAULT,
    )
    show.add_argument("key_id")
    listing = tree.add(
        "keys list",
        _cmd_keys_list,
        "list every key with its latest version's state (--via-broker: your keys, by the fleet)",
        client=True,
        settings=VAULT,
    )
    _add_read_arguments(show, listing)
    attest = tree.add(
        "keys attest",
        _cmd_keys_attest,
        "check the TPM's attestation of the key the fleet serves, with a pinned attestation key",
        client=True,
    )
    attest.add_argument("key_id")
    attest.add_argument("--version", type=int, default=None)
    attest.add_argument(
        "--attestation-key",
        type=Path,
        required=True,
        metavar="FILE",
        help="the fleet attestation key (PEM), pinned from `zandd tpm attestation-key`",
    )
