"""The audit log from a shell: ``zandd audit verify`` and ``zandd audit tail``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from contracts.errors import ConfigurationError, IntegrityError
from contracts.models import AuditHeadEvent
from vault.audit import AuditEntry, AuditQuery, AuditReport, ChainHead, check_log
from vault.audit_chain import ChainKeys, link_kek_id
from workers.commands.base import BROKER, VAULT, CommandTree
from workers.commands.jsonout import LINES, add_json_flag, dumps
from workers.commands.local import opened_store, printable, when
from workers.service.config import Settings

if TYPE_CHECKING:
    from vault.store import VaultStore


async def _cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    from workers.service.hygiene import harden_for_key_material
    from workers.service.ringsetup import load_ring

    known = _known_head(args)
    harden_for_key_material(lock_memory=settings.lock_memory)
    keys = ChainKeys(load_ring(settings))
    async with opened_store(settings) as store:
        vouched, unchecked = await _vouched(args, settings, store)
        # A broken chain raises AuditBroken, whose one sentence names the first bad entry.
        report = await check_log(store, keys, known, vouched)
    if report.legacy_entries and not report.keyed_entries and not args.legacy:
        raise IntegrityError(
            f"no audit entry is keyed (all {report.legacy_entries} are legacy, unkeyed): either "
            "no worker of this version has written yet, or a writer without the KEK ring "
            "re-chained the log; pass --legacy to accept it"
        )
    head = report.head
    print(f"audit log intact: {head.seq} entries, head #{head.seq} {head.entry_hash}")
    if report.redelivered_entries:
        print(
            f"redelivered: {report.redelivered_entries} entries are of requests the broker had "
            "delivered before (a worker lost its connection before acking): an earlier entry "
            "with the same request id may be the same request, so count requests by request id"
        )
    for line in describe(report):
        print(line)
    if vouched == {}:
        print(
            "checkpoints: none in the vault or given: nothing vouches against a cut (the keygen "
            "worker makes one every ZANDD_AUDIT_CHECKPOINT_EVERY_ENTRIES entries; keep copies "
            "elsewhere and pass --checkpoints FILE)"
        )
    if unchecked:
        print(
            f"checkpoints: {unchecked} TPM-signed checkpoints not checked (give "
            "--checkpoint-key FILE from zandd tpm checkpoint-key)"
        )
    return 0


async def _vouched(
    args: argparse.Namespace, settings: Settings, store: VaultStore
) -> tuple[dict[int, str] | None, int]:
    """The links the checkpoints (stored and exported) vouch for, their signatures checked;
    without a key, None and how many were left unchecked."""
    from vault.audit_checkpoint import all_checkpoints, check_signatures
    from workers.commands.checkpoints import load_checkpoint_key, read_exported

    checkpoints = await all_checkpoints(store)
    if args.checkpoints is not None:
        checkpoints += read_exported(args.checkpoints)
    if args.checkpoint_key is None:
        return None, len(checkpoints)
    key = load_checkpoint_key(args.checkpoint_key, settings)
    # A forged (or altered) checkpoint raises CheckpointForged: refused, never skipped.
    by_seq = check_signatures(checkpoints, key)
    return {seq: checkpoint.link for seq, checkpoint in by_seq.items()}, 0


def describe(report: AuditReport) -> list[str]:
    """What ``zandd audit verify`` checked, one line per kind of check."""
    legacy, keyed = report.legacy_entries, report.keyed_entries
    lines = [
        f"keyed links (HMAC-SHA256 under the ring's audit key): #{legacy + 1} to #{legacy + keyed}"
        f", KEK {', '.join(report.kek_ids)}"
        if keyed
        else "keyed links: none",
        f"legacy unkeyed links (SHA-256, before the first keyed entry): #1 to #{legacy}"
        if legacy
        else "legacy unkeyed links: none",
    ]
    lines += _describe_checkpoints(report)
    if report.known_head is None:
        lines.append(
            "head: not checked (give --head SEQ:LINK from an audit.head event on zandd.events): "
            "a cut of the newest entries shows only against a head kept elsewhere"
        )
    else:
        known = report.known_head
        matches = "and matches" if known.entry_hash else "(no link given to compare)"
        lines.append(f"head: the log reaches the known head #{known.seq} {matches}")
    return lines


def _describe_checkpoints(report: AuditReport) -> list[str]:
    newest = report.checkpoint
    if newest is None:
        return []
    after = report.head.seq - newest.seq
    lines = [
        f"checkpoints: {report.checkpoints} TPM-signed checkpoints verified; the log reaches "
        f"the newest, #{newest.seq}, and matches it"
    ]
    if after:
        lines.append(
            f"after the newest checkpoint: {after} entries (#{newest.seq + 1} to "
            f"#{report.head.seq}) no checkpoint vouches for yet: a cut of them would not show"
        )
    return lines


def _known_head(args: argparse.Namespace) -> ChainHead | None:
    heads = [parse_head(text) for text in args.head]
    if args.head_file is not None:
        heads += _heads_in(args.head_file)
    return max(heads, key=lambda head: head.seq, default=None)


def parse_head(text: str) -> ChainHead:
    """``SEQ:LINK`` (what ``audit verify`` prints as ``#SEQ LINK``, or an ``audit.head`` event's
    ``seq`` and ``link``) → a head; a JSON ``audit.head`` event body is accepted too, and so is
    ``SEQ`` alone (``zandd_audit_head_seq``), whose link is then not compared (empty)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            event = AuditHeadEvent.model_validate_json(text)
        except ValueError:
            raise ConfigurationError("an audit head line is not an audit.head event") from None
        return ChainHead(seq=event.seq, entry_hash=event.link)
    seq, separator, link = text.removeprefix("#").replace(" ", ":", 1).partition(":")
    if not seq.isdigit():
        raise ConfigurationError(f"{printable(text[:80])!r} is not a head: expected SEQ:LINK")
    if not separator:  # a sequence number alone (the metric): the log must reach it
        return ChainHead(seq=int(seq), entry_hash="")
    try:
        link_kek_id(link)
    except ValueError:
        raise ConfigurationError(f"{printable(text[:80])!r} is not a head: bad link") from None
    return ChainHead(seq=int(seq), entry_hash=link)


def _heads_in(path: Path) -> list[ChainHead]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the head file {path}: {exc}") from None
    return [parse_head(line) for line in lines if line.strip()]


async def _cmd_audit_keep_heads(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import socket
    import uuid

    from aio_pika.abc import AbstractIncomingMessage

    from contracts.amqp import connect_plain
    from contracts.operations import AUDIT_HEAD_EVENT
    from contracts.topology import EVENTS_EXCHANGE

    kept = 0
    enough = asyncio.Event()
    # Named like a signer's event queue, so the least-privilege signer user may run this too.
    queue_name = (
        f"{EVENTS_EXCHANGE}.{socket.gethostname()[:64]}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    )

    async def keep(message: AbstractIncomingMessage) -> None:
        nonlocal kept
        if message.type != AUDIT_HEAD_EVENT:
            return
        try:
            head = AuditHeadEvent.model_validate_json(message.body)
        except ValueError:
            print("zandd: ignored a malformed audit.head event", file=sys.stderr)
            return
        _append_line(args.file, head.model_dump_json())
        kept += 1
        print(f"kept audit head #{head.seq} {head.link}", flush=True)
        if args.count is not None and kept >= args.count:
            enough.set()

    connection = await connect_plain(settings.amqp_url, connection_name="zandd-audit-heads")
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
        queue = await channel.declare_queue(queue_name, exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        await queue.consume(keep, no_ack=True)
        print(f"keeping audit heads from {EVENTS_EXCHANGE} in {args.file}", flush=True)
        await enough.wait()
    return 0


def _append_line(path: Path, line: str) -> None:
    """Append one line and make it durable: a kept head is only worth something if it stays."""
    with path.open("a", encoding="utf-8") as file:
        file.write(line + "\n")
        file.flush()
        os.fsync(file.fileno())


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
    if event.data_sha256:
        line += f" sha256={printable(event.data_sha256)}"
    # The broker had delivered the request before: an earlier entry may be the same request's.
    return line + (" redelivered" if event.redelivered else "")


async def _cmd_audit_tail(args: argparse.Namespace, settings: Settings) -> int:
    query = AuditQuery(limit=args.lines, key_id=args.key, principal=args.principal, latest=True)
    async with opened_store(settings) as store:
        entries = await store.read_audit(query)
    for entry in entries:
        print(dumps(entry_document(entry)) if args.json else format_entry(entry))
    return 0


def entry_document(entry: AuditEntry) -> dict[str, object]:
    """One audit entry as ``audit tail --json`` shows it (one JSON line each)."""
    return {
        "seq": entry.seq,
        **dataclasses.asdict(entry.event),
        "prev_hash": entry.prev_hash,
        "entry_hash": entry.entry_hash,
    }


async def _cmd_audit_show(args: argparse.Namespace, settings: Settings) -> int:
    async with opened_store(settings) as store:
        found = await store.read_audit(AuditQuery(after_seq=args.seq - 1, limit=1))
    if not found or found[0].seq != args.seq:
        print(f"zandd: the audit log has no entry #{args.seq}", file=sys.stderr)
        return 1
    entry = found[0]
    print(format_entry(entry))
    print(f"link {printable(entry.entry_hash)}")
    print(f"prev {printable(entry.prev_hash)}")
    return 0


def _sequence_number(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{printable(text[:40])!r} is not an entry number")
    return int(text)


def register(tree: CommandTree) -> None:
    """Add the audit commands."""
    verify = tree.add(
        "audit verify",
        _cmd_audit_verify,
        "check the audit log's keyed chain (and a known head) and name the first broken entry",
        settings=VAULT,
    )
    verify.add_argument(
        "--head",
        action="append",
        default=[],
        metavar="SEQ:LINK",
        help="a head published earlier (audit.head on zandd.events), or SEQ alone "
        "(zandd_audit_head_seq); repeatable, the highest wins",
    )
    verify.add_argument(
        "--head-file",
        type=Path,
        default=None,
        help="a file of heads, one per line (SEQ:LINK or an audit.head event's JSON)",
    )
    verify.add_argument(
        "--checkpoint-key",
        default=None,
        metavar="FILE",
        help="the TPM's checkpoint public key (PEM, from zandd tpm checkpoint-key), or 'tpm' "
        "to read it from the TPM: check every checkpoint's signature and that the log "
        "reaches the newest",
    )
    verify.add_argument(
        "--checkpoints",
        type=Path,
        default=None,
        metavar="FILE",
        help="checkpoints kept elsewhere (zandd audit checkpoints --jsonl), checked with the "
        "vault's own",
    )
    verify.add_argument(
        "--legacy",
        action="store_true",
        help="accept a log without any keyed entry (a vault no worker of this version wrote to)",
    )
    keep = tree.add(
        "audit keep-heads",
        _cmd_audit_keep_heads,
        "append every audit head published on zandd.events to a file (run it on another host)",
        settings=BROKER,
    )
    keep.add_argument("file", type=Path, help="heads file, one audit.head event per line")
    keep.add_argument(
        "--count", type=int, default=None, help="stop after this many heads (default: Ctrl-C)"
    )
    show = tree.add(
        "audit show",
        _cmd_audit_show,
        "show one audit entry (a receipt's seq) and its link",
        settings=VAULT,
    )
    show.add_argument("seq", type=_sequence_number, help="the entry's sequence number")
    tail = tree.add("audit tail", _cmd_audit_tail, "show the newest audit entries", settings=VAULT)
    tail.add_argument("--key", default=None, help="only entries about this key id")
    tail.add_argument("--principal", default=None, help="only entries by this AMQP user")
    tail.add_argument("-n", "--lines", type=int, default=20, help="how many entries (default 20)")
    add_json_flag(tail, LINES)
