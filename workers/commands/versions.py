"""Key versions from a shell (issue 15): ``zandd keys rotate`` and ``zandd keys update``.

Both go through the fleet like any producer: the keygen worker checks that the caller owns
the key or is an admin, audits the request and tells the signers before it answers.
"""

from __future__ import annotations

import argparse
import re

from contracts.models import MAX_ROTATION_PERIOD_S, MIN_ROTATION_PERIOD_S
from workers.commands.base import CommandTree
from workers.commands.local import printable, when
from workers.service.config import Settings

_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400, "y": 365 * 86_400}
_DURATION = re.compile(r"^(\d{1,12})([smhdwy]?)$")
#: ``--rotation-period none``: no automatic rotation.
NONE = "none"


def rotation_period(text: str) -> int | None:
    """``90d``, ``12w``, ``1y``, ``86400`` (seconds) or ``none`` → seconds or None.

    Bounded like the wire field (1 day to 10 years); argparse turns a ValueError into a
    usage error naming the option.
    """
    if text.strip().lower() == NONE:
        return None
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r}")
    seconds = int(match.group(1)) * _UNITS_S[match.group(2) or "s"]
    if not MIN_ROTATION_PERIOD_S <= seconds <= MAX_ROTATION_PERIOD_S:
        raise ValueError(f"{text!r}")
    return seconds


rotation_period.__name__ = "rotation period (1d to 3650d, or none)"


def describe_period(seconds: int | None) -> str:
    """A rotation period as an operator reads it."""
    if seconds is None:
        return NONE
    days, rest = divmod(seconds, 86_400)
    return f"{days}d" if rest == 0 else f"{seconds}s"


async def _cmd_keys_rotate(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.client import SigningClient

    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        reply = await client.rotate_key(args.key_id, request_id=args.request_id)
    print(f"{reply.key_id} v{reply.version}: enabled, primary")
    if reply.next_rotation_at is not None:
        print(f"next rotation: {when(reply.next_rotation_at)}")
    print(reply.public_key_pem, end="")
    return 0


async def _cmd_keys_update(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.client import UNCHANGED, SigningClient

    label = None if args.no_label else (args.label if args.label is not None else UNCHANGED)
    signers = args.allowed_signer if args.allowed_signer is not None else UNCHANGED
    if args.owner_only:
        signers = None
    period = UNCHANGED if args.rotation_period is UNCHANGED_FLAG else args.rotation_period
    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        reply = await client.update_key(
            args.key_id, label=label, allowed_signers=signers, rotation_period=period
        )
    print(f"key {reply.key_id} (primary v{reply.primary_version})")
    print(f"  label:           {printable(reply.label)}")
    print(f"  allowed signers: {', '.join(printable(s) for s in reply.allowed_signers)}")
    print(f"  rotation period: {describe_period(reply.rotation_period)}")
    if reply.next_rotation_at is not None:
        print(f"  next rotation:   {when(reply.next_rotation_at)}")
    return 0


#: ``--rotation-period`` not given (``None`` is "none": no automatic rotation).
UNCHANGED_FLAG = object()


def register(tree: CommandTree) -> None:
    """Add ``keys rotate`` and ``keys update``."""
    rotate = tree.add(
        "keys rotate",
        _cmd_keys_rotate,
        "make a new version of a key in the TPM and make it the one sign uses",
        client=True,
    )
    rotate.add_argument("key_id")
    rotate.add_argument(
        "--request-id", default=None, help="idempotency key (a retry returns the same version)"
    )
    update = tree.add(
        "keys update",
        _cmd_keys_update,
        "change a key's label, allowed signers or rotation period (owner or admin)",
        client=True,
    )
    update.add_argument("key_id")
    labels = update.add_mutually_exclusive_group()
    labels.add_argument("--label", default=None)
    labels.add_argument("--no-label", action="store_true", help="remove the label")
    signers = update.add_mutually_exclusive_group()
    signers.add_argument(
        "--allowed-signer",
        action="append",
        default=None,
        help="repeatable; replaces the list; * for anyone",
    )
    signers.add_argument(
        "--owner-only", action="store_true", help="only the owner may sign (the default list)"
    )
    update.add_argument(
        "--rotation-period",
        type=rotation_period,
        default=UNCHANGED_FLAG,
        help="rotate automatically this often: 90d, 12w, 1y, seconds, or none",
    )
