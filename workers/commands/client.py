"""Calling the fleet from a shell: ``zandd keys create|public``, ``zandd sign``, ``zandd verify``."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path

from contracts.algorithms import ALGORITHM_ECDSA_P256_SHA256, ALGORITHMS, encoding_of
from contracts.errors import ZanddError
from workers.commands.base import EXIT_FAILURE, CommandTree
from workers.service.config import Settings


async def _cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.client import SigningClient

    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        reply = await client.create_key(
            label=args.label,
            allowed_signers=args.allowed_signer,
            request_id=args.request_id,
            protection=args.protection,
            rotation_period=args.rotation_period,
            algorithm=args.algorithm,
        )
    print(reply.key_id)
    print(reply.public_key_pem, end="")
    return 0


async def _cmd_keys_public(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.client import SigningClient

    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        reply = await client.public_key(args.key_id, args.version, all_versions=args.all_versions)
    if args.all_versions:  # issue 15: every version, as a JWK set or PEMs
        versions = reply.versions or []
        if args.jwk:
            keys = [version.public_key_jwk.model_dump(mode="json") for version in versions]
            print(json.dumps({"keys": keys}, indent=2))
        for version in [] if args.jwk else versions:
            print(f"# {reply.key_id} v{version.version}")
            print(version.public_key_pem, end="")
    elif args.jwk:
        print(reply.public_key_jwk.model_dump_json(indent=2))
    else:
        print(reply.public_key_pem, end="")
    return 0


def _payload(
    path: Path, as_digest: bool, hash_name: str = "sha256"
) -> tuple[bytes | None, bytes | None]:
    data = path.read_bytes()
    return (None, hashlib.new(hash_name, data).digest()) if as_digest else (data, None)


async def _cmd_sign(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.client import SigningClient

    message, digest = _payload(args.file, args.digest, args.digest_hash)
    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        sign = client.sign_in_tpm if args.tpm else client.sign
        reply = await sign(args.key, message, digest=digest, encoding=args.encoding or "der")
    if args.out:
        args.out.write_bytes(reply.signature)
        print(f"wrote {len(reply.signature)}-byte {reply.encoding} signature to {args.out}")
    else:
        print(base64.b64encode(reply.signature).decode("ascii"))
    return 0


def _read_signature(value: str) -> bytes:
    try:
        is_file = Path(value).is_file()
    except OSError:  # longer than a file name may be: an RSA-3072 signature in base64
        is_file = False
    path = Path(value)
    if is_file:
        raw = path.read_bytes()
        stripped = raw.strip()
        try:
            return base64.b64decode(stripped, validate=True) if stripped.isascii() else raw
        except ValueError:
            return raw
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ZanddError(f"{value!r} is neither a signature file nor base64") from None


async def _cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    message, digest = _payload(args.file, args.digest, args.digest_hash)
    signature = _read_signature(args.signature)
    # Without --encoding, told by the signature's form: raw r||s is 64 bytes (P-256) or 96
    # (P-384), DER parses as DER; RSA signatures are the same in both (contracts/algorithms.py).
    args.encoding = args.encoding or encoding_of(signature)
    if args.on_fleet:
        return await _verify_on_fleet(args, settings, signature, message, digest)
    if args.version is not None:
        raise ZanddError("--version needs --on-fleet")
    if args.public_key is not None:
        from contracts.pinning import PinnedKey

        # Offline: the pinned key alone decides, no broker and no vault is asked.
        pinned = PinnedKey.from_file(args.public_key, algorithm=args.algorithm)
        valid = pinned.verify(signature, message=message, digest=digest, encoding=args.encoding)
    else:
        from contracts.client import SigningClient

        async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
            valid = await client.verify_trusting_fleet(
                args.key, signature, message=message, digest=digest, encoding=args.encoding
            )
        print(
            "zandd: checked against the public key the fleet serves (as the vault says); "
            "pin it with --public-key FILE",
            file=sys.stderr,
        )
    print("signature OK" if valid else "signature INVALID")
    return 0 if valid else EXIT_FAILURE


# -- issue 15, reads: zandd verify --key K --on-fleet (the fleet's verify) -------------------


async def _verify_on_fleet(
    args: argparse.Namespace,
    settings: Settings,
    signature: bytes,
    message: bytes | None,
    digest: bytes | None,
) -> int:
    from contracts.client import SigningClient

    if args.key is None:
        raise ZanddError("--on-fleet needs --key KEY_ID (the fleet checks with that key)")
    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        reply = await client.verify_on_fleet(
            args.key,
            signature,
            message=message,
            digest=digest,
            encoding=args.encoding,
            version=args.version,
        )
    print(
        f"zandd: the fleet checked it with {reply.key_id} v{reply.version} (its vault record's "
        "public key); pin the key with --public-key FILE to trust no one",
        file=sys.stderr,
    )
    print("signature OK" if reply.valid else "signature INVALID")
    return 0 if reply.valid else EXIT_FAILURE


# -- end issue 15, reads --------------------------------------------------------------------


def register(tree: CommandTree) -> None:
    """Add the client commands."""
    create = tree.add("keys create", _cmd_keys_create, "create a key in the TPM", client=True)
    create.add_argument("--label", default=None)
    create.add_argument(
        "--allowed-signer", action="append", default=None, help="repeatable; * for anyone"
    )
    create.add_argument(
        "--request-id", default=None, help="idempotency key (a retry returns the same key)"
    )
    create.add_argument(
        "--protection",
        choices=("exportable", "tpm"),
        default="exportable",
        help="tpm: the key never leaves the TPM and is signed with by the keygen worker (slow)",
    )
    from workers.commands.versions import rotation_period  # issue 15, key writes

    create.add_argument(
        "--rotation-period",
        type=rotation_period,
        default=None,
        help="rotate the key automatically this often: 90d, 12w, 1y, seconds (default: never)",
    )
    # -- algorithms (issue 15) --
    create.add_argument(
        "--algorithm",
        choices=tuple(ALGORITHMS),
        default=ALGORITHM_ECDSA_P256_SHA256,
        help="the key's signing algorithm, fixed for its life (RSA keygen takes ~0.2-0.5 s in swtpm)",
    )
    # -- end algorithms --
    public = tree.add("keys public", _cmd_keys_public, "print a key's public key", client=True)
    public.add_argument("key_id")
    public.add_argument("--version", type=int, default=None)
    public.add_argument("--jwk", action="store_true", help="print a JWK instead of PEM")
    public.add_argument(
        "--all-versions",
        action="store_true",
        help="every version's public key (with --jwk: a JWK set)",
    )

    sign = tree.add("sign", _cmd_sign, "sign a file", client=True)
    sign.add_argument("--key", required=True, help="key id, or an alias (alias/<name>)")
    sign.add_argument(
        "--tpm", action="store_true", help="the key has protection tpm: sign in the TPM (sign.tpm)"
    )
    verify = tree.add(
        "verify",
        _cmd_verify,
        "verify a file's signature locally, against a pinned public key (offline) or the fleet's",
        client=True,
    )
    against = verify.add_mutually_exclusive_group(required=True)
    against.add_argument(
        "--public-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="the pinned public key (PEM or JWK, as keys create or keys public --jwk print it); "
        "needs no broker",
    )
    against.add_argument(
        "--key",
        default=None,
        help="key id: trust the public key the fleet serves (as the vault says)",
    )
    for parser in (sign, verify):
        parser.add_argument("file", type=Path)
        parser.add_argument(
            "--digest", action="store_true", help="send only the file's SHA-256 digest"
        )
        parser.add_argument(
            "--encoding",
            choices=("der", "raw"),
            default=None,
            help="ECDSA: DER or raw r||s (default: der for sign; for verify, told by the "
            "signature: raw is 64 bytes for P-256, 96 for P-384)",
        )
        # -- algorithms (issue 15) --
        parser.add_argument(
            "--digest-hash",
            choices=("sha256", "sha384"),
            default="sha256",
            help="with --digest: the hash of the key's algorithm (sha384 for ecdsa-p384-sha384)",
        )
        # -- end algorithms --
    verify.add_argument(
        "--algorithm",
        choices=tuple(ALGORITHMS),
        default=None,
        help="the pinned key's algorithm: needed for an RSA key given as PEM (a JWK names it)",
    )
    sign.add_argument(
        "--out", type=Path, default=None, help="write the binary signature here (default: base64)"
    )
    verify.add_argument("signature", help="signature file (binary or base64) or base64 text")
    verify.add_argument(
        "--on-fleet",
        action="store_true",
        help="with --key: have the fleet verify (verify), for hosts that cannot do ECDSA",
    )
    verify.add_argument(
        "--version",
        type=int,
        default=None,
        help="with --on-fleet: the key version (default: the current one)",
    )
