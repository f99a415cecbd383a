"""``zandd``: run the fleet, its workers, and talk to it from a shell.

Every failure the user can do something about ends in one sentence on stderr and a non-zero
exit code, never a traceback (``--log-level DEBUG`` shows the details).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contracts.errors import ZanddError
from workers.config import Settings

if TYPE_CHECKING:
    from workers.keygen.tpm import Tpm

log = logging.getLogger("zandd.cli")

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_SETTING_FLAGS = {
    "amqp_url": "AMQP URL of the broker",
    "data_dir": "directory for the SQLite vault, the KEK ring and swtpm state",
    "vault_url": "vault URL (sqlite:///path.db)",
    "kek_file": "KEK ring file",
    "tpm_tcti": "TPM TCTI, e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (each also ZANDD_<NAME> in the environment)")
    for name, help_text in _SETTING_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, dest=name, default=None, help=help_text)


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name) for name in _SETTING_FLAGS if getattr(args, name, None)}
    return Settings(**overrides)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s",
        stream=sys.stderr,
    )
    if logging.getLogger().level > logging.DEBUG:
        # aio-pika/aiormq log every failed connection attempt with its own words and the TSS
        # C library prints to stderr; our one sentence says it. DEBUG shows them all.
        logging.getLogger("aiormq").setLevel(logging.CRITICAL)
        logging.getLogger("aio_pika").setLevel(logging.CRITICAL)
        os.environ.setdefault("TSS2_LOG", "all+none")


# -- commands -------------------------------------------------------------------------------


async def _cmd_signer(args: argparse.Namespace, settings: Settings) -> int:
    from workers.serve import serve_signer

    await serve_signer(settings, concurrency=args.concurrency)
    return 0


async def _cmd_keygen(args: argparse.Namespace, settings: Settings) -> int:
    from workers.serve import serve_keygen

    await serve_keygen(settings)
    return 0


async def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from workers.demo import run_demo
    from workers.fleet import run_up

    async def demo() -> int:
        result = await run_demo(settings.amqp_url)
        print(result.line, flush=True)
        return 0 if result.verified == result.total else EXIT_FAILURE

    return await run_up(settings, signers=args.signers, after_ready=demo if args.demo else None)


async def _cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.client import SigningClient

    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        reply = await client.create_key(
            label=args.label, allowed_signers=args.allowed_signer, request_id=args.request_id
        )
    print(reply.key_id)
    print(reply.public_key_pem, end="")
    return 0


async def _cmd_keys_public(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.client import SigningClient

    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        reply = await client.public_key(args.key_id, args.version)
    if args.jwk:
        print(reply.public_key_jwk.model_dump_json(indent=2))
    else:
        print(reply.public_key_pem, end="")
    return 0


def _payload(path: Path, as_digest: bool) -> tuple[bytes | None, bytes | None]:
    data = path.read_bytes()
    return (None, hashlib.sha256(data).digest()) if as_digest else (data, None)


async def _cmd_sign(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.client import SigningClient

    message, digest = _payload(args.file, args.digest)
    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        reply = await client.sign(args.key, message, digest=digest, encoding=args.encoding)
    if args.out:
        args.out.write_bytes(reply.signature)
        print(f"wrote {len(reply.signature)}-byte {reply.encoding} signature to {args.out}")
    else:
        print(base64.b64encode(reply.signature).decode("ascii"))
    return 0


def _read_signature(value: str) -> bytes:
    path = Path(value)
    if path.is_file():
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
    from contracts.client import SigningClient

    message, digest = _payload(args.file, args.digest)
    signature = _read_signature(args.signature)
    async with await SigningClient.connect(settings.amqp_url, timeout_s=args.timeout) as client:
        valid = await client.verify(
            args.key, signature, message=message, digest=digest, encoding=args.encoding
        )
    print("signature OK" if valid else "signature INVALID")
    return 0 if valid else EXIT_FAILURE


async def _cmd_vault_init(args: argparse.Namespace, settings: Settings) -> int:
    from vault.kek import KekRing
    from vault.store import open_store

    path = settings.resolved_kek_file
    if path.exists():
        print(f"KEK ring {path} exists already; kept as it is")
    else:
        with ExitStack() as stack:
            tpm = _reachable_tpm(settings)
            if tpm is None:
                ring = KekRing.create(path)
                source = "the OS RNG (no TPM reachable)"
            else:
                stack.enter_context(tpm)
                ring = KekRing.create(path, random_bytes=tpm.get_random)
                source = "the TPM's RNG mixed with the OS RNG"
        print(f"created KEK ring {path} (active KEK {ring.active.kek_id}, from {source})")
    store = await open_store(settings.resolved_vault_url)
    await store.close()
    print(f"vault ready at {settings.resolved_vault_url}")
    return 0


def _reachable_tpm(settings: Settings) -> Tpm | None:
    try:
        from workers.keygen.tpm import Tpm
        from workers.serve import resolve_tcti

        return Tpm(resolve_tcti(settings))
    except (ImportError, ZanddError) as exc:
        log.debug("no TPM for the KEK ring: %s", exc)
        return None


async def _cmd_tpm_check(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from workers.keygen.tpm import Tpm
    from workers.serve import resolve_tcti

    tcti = resolve_tcti(settings)
    with Tpm(tcti) as tpm:
        info = tpm.info()
        print(
            f"TPM at {tcti}: {info.manufacturer} {info.vendor}, firmware {info.firmware_version}, spec {info.spec}"
        )
        started = time.perf_counter()
        with tpm.create_exportable_p256() as exported:
            public_key = exported.public_key()
        elapsed_ms = (time.perf_counter() - started) * 1000
    print(
        f"create → export → flush round trip: OK in {elapsed_ms:.1f} ms (public key on {public_key.curve.name})"
    )
    return 0


# -- parser ---------------------------------------------------------------------------------

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


def _sub(
    subparsers: Any, name: str, command: Command, help_text: str, *, client: bool = False
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help_text, description=help_text
    )
    parser.set_defaults(command=command)
    _add_setting_flags(parser)
    if client:
        parser.add_argument(
            "--timeout", type=float, default=30.0, help="seconds to wait for the reply"
        )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``zandd`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="zandd", description="ZANDD HSM: TPM-born keys, sealed at rest, signed over RabbitMQ."
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    _sub(commands, "keygen-worker", _cmd_keygen, "run the keygen worker (owns the TPM)")
    signer = _sub(commands, "signer", _cmd_signer, "run a signer worker")
    signer.add_argument(
        "--concurrency", type=int, default=None, help="requests in flight (prefetch)"
    )

    up = _sub(commands, "up", _cmd_up, "run the whole fleet on this machine")
    up.add_argument("--signers", type=int, default=2, help="signer processes (default 2)")
    up.add_argument("--demo", action="store_true", help="prove the fleet works, then exit")

    keys = commands.add_parser("keys", help="create keys and read public keys").add_subparsers(
        title="keys commands", required=True, metavar="COMMAND"
    )
    create = _sub(keys, "create", _cmd_keys_create, "create a key in the TPM", client=True)
    create.add_argument("--label", default=None)
    create.add_argument(
        "--allowed-signer", action="append", default=None, help="repeatable; * for anyone"
    )
    create.add_argument(
        "--request-id", default=None, help="idempotency key (a retry returns the same key)"
    )
    public = _sub(keys, "public", _cmd_keys_public, "print a key's public key", client=True)
    public.add_argument("key_id")
    public.add_argument("--version", type=int, default=None)
    public.add_argument("--jwk", action="store_true", help="print a JWK instead of PEM")

    sign = _sub(commands, "sign", _cmd_sign, "sign a file", client=True)
    verify = _sub(commands, "verify", _cmd_verify, "verify a file's signature locally", client=True)
    for command_parser in (sign, verify):
        command_parser.add_argument("--key", required=True, help="key id")
        command_parser.add_argument("file", type=Path)
        command_parser.add_argument(
            "--digest", action="store_true", help="send only the file's SHA-256 digest"
        )
        command_parser.add_argument("--encoding", choices=("der", "raw"), default="der")
    sign.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the binary signature here (default: base64 on stdout)",
    )
    verify.add_argument("signature", help="signature file (binary or base64) or base64 text")

    vault = commands.add_parser("vault", help="the key vault").add_subparsers(
        title="vault commands", required=True, metavar="COMMAND"
    )
    _sub(vault, "init", _cmd_vault_init, "create the KEK ring (from the TPM's RNG) and the vault")

    tpm = commands.add_parser("tpm", help="the TPM").add_subparsers(
        title="tpm commands", required=True, metavar="COMMAND"
    )
    _sub(tpm, "check", _cmd_tpm_check, "show the TPM and do one create-export-flush round trip")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zandd`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ValueError as exc:
        print(f"zandd: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _configure_logging(settings.log_level)
    try:
        command: Command = args.command
        return asyncio.run(command(args, settings))
    except ZanddError as exc:
        log.debug("failed", exc_info=True)
        print(f"zandd: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(f"zandd: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
