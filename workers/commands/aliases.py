"""Aliases from a shell (issue 15): ``zandd keys alias-set``, ``keys alias-delete`` and ``keys aliases``.

``set`` and ``delete`` go through the fleet like any producer (the keygen worker checks who
may, audits it and tells the signers before it answers); ``list`` reads the vault, like
``zandd keys list``, and says when a row's MAC does not hold (the workers refuse it).
"""

from __future__ import annotations

import argparse

from contracts.errors import IntegrityError, ZanddError
from workers.commands.base import VAULT, CommandTree
from workers.commands.local import opened_store, printable, when
from workers.service.config import Settings


async def _cmd_alias_set(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.client import SigningClient

    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        reply = await client.set_alias(args.alias, args.key_id)
    was = "" if reply.previous_key_id is None else f" (was {reply.previous_key_id})"
    print(f"{reply.alias} -> {reply.key_id}{was}, owner {printable(reply.owner)}")
    return 0


async def _cmd_alias_delete(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.client import SigningClient

    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        reply = await client.delete_alias(args.alias)
    print(f"{reply.alias} deleted (it pointed at {reply.previous_key_id})")
    return 0


async def _cmd_alias_list(args: argparse.Namespace, settings: Settings) -> int:
    from vault.aliases import verify_alias
    from workers.service.hygiene import harden_for_key_material
    from workers.service.ringsetup import load_ring

    try:
        harden_for_key_material(lock_memory=settings.lock_memory)
        ring = load_ring(settings)
    except ZanddError:
        ring = None
    async with opened_store(settings) as store:
        rows = await store.list_aliases(key_id=args.key_id, owner=args.owner)
    print(f"{'ALIAS':<40} {'KEY':<24} {'OWNER':<20} UPDATED")
    for row in rows:
        note = "" if ring is not None else " (MAC not checked: no KEK ring here)"
        if ring is not None:
            try:
                verify_alias(row, ring)
            except IntegrityError as exc:
                note = f" — REFUSED BY THE WORKERS: {exc.message}"
        print(
            f"{row.alias:<40} {row.key_id:<24} {printable(row.owner):<20} "
            f"{when(row.updated_at)}{note}"
        )
    return 0


def register(tree: CommandTree) -> None:
    """Add ``keys alias-set``, ``keys alias-delete`` and ``keys aliases``."""
    set_ = tree.add(
        "keys alias-set",
        _cmd_alias_set,
        "point an alias (alias/<name>) at a key of yours; creates it or re-points it",
        client=True,
    )
    set_.add_argument("alias", help="alias/ then 1-128 of A-Z a-z 0-9 . _ -")
    set_.add_argument("key_id")
    delete = tree.add(
        "keys alias-delete", _cmd_alias_delete, "remove an alias of yours", client=True
    )
    delete.add_argument("alias")
    listed = tree.add("keys aliases", _cmd_alias_list, "the vault's aliases", settings=VAULT)
    listed.add_argument("--key-id", default=None, help="only those pointing at this key")
    listed.add_argument("--owner", default=None, help="only those this principal owns")
