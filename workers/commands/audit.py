"""The audit log from a shell: ``zandd audit verify`` and ``zandd audit tail``."""

from __future__ import annotations

import argparse

from vault.audit import AuditEntry, AuditQuery, verify_log
from workers.commands.base import CommandTree
from workers.commands.local import opened_store, printable, when
from workers.config import Settings


async def _cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    async with opened_store(settings) as store:
        # A broken chain raises AuditBroken, whose one sentence names the first bad entry.
        head = await verify_log(store)
    print(f"audit log intact: {head.seq} entries, head #{head.seq} {head.entry_hash}")
    print("keep the head elsewhere: an intact chain cannot show its newest entries were cut")
    return 0


def format_entry(entry: AuditEntry) -> str:
    """One line per entry; every field is escaped for the terminal (callers chose some, and a
    vault writer could have chosen any)."""
    event = entry.event
    key = "-" if event.key_id is None else printable(event.key_id)
    if event.version is not None:
        key += f" v{event.version}"
    line = (
        f"#{entry.seq} {when(event.at)} {printable(event.principal)} "
        f"{printable(event.operation)} {key} {printable(event.outcome)} "
        f"request={printable(event.request_id)}"
    )
    return line + (f" sha256={printable(event.data_sha256)}" if event.data_sha256 else "")


async def _cmd_audit_tail(args: argparse.Namespace, settings: Settings) -> int:
    query = AuditQuery(limit=args.lines, key_id=args.key, principal=args.principal, latest=True)
    async with opened_store(settings) as store:
        entries = await store.read_audit(query)
    for entry in entries:
        print(format_entry(entry))
    return 0


def register(tree: CommandTree) -> None:
    """Add the audit commands."""
    tree.add(
        "audit verify",
        _cmd_audit_verify,
        "check the audit log's hash chain and name the first broken entry",
    )
    tail = tree.add("audit tail", _cmd_audit_tail, "show the newest audit entries")
    tail.add_argument("--key", default=None, help="only entries about this key id")
    tail.add_argument("--principal", default=None, help="only entries by this AMQP user")
    tail.add_argument("-n", "--lines", type=int, default=20, help="how many entries (default 20)")
