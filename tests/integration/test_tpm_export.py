"""What a sniffer of the TPM interface sees while the keygen worker exports a key (real swtpm).

A relay between the TPM client and swtpm records every byte both ways, on the command port
and on the control port, the way a bus or socket sniffer would.
"""

from __future__ import annotations

import base64
import hmac
import socket
import threading
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass

import pytest

pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is not installed", exc_type=ImportError)

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from tpm2_pytss import TPM2_CC

from workers.keygen.tpm import Tpm

pytestmark = pytest.mark.tpm

HOST = "127.0.0.1"
MESSAGE = b"zandd export capture"
KEYS = 3
# A TPM command: tag (2 bytes), size of the whole command (4), command code (4); a response
# has its response code where a command has its command code.
_HEADER_BYTES = 10
_TPM_ST_SESSIONS = 0x8002
_DUPLICATE_HANDLES = 2
_CHUNK_BYTES = 65536
_ACCEPT_POLL_S = 0.1


Stream = tuple[str, int]  # (the port's role, the connection's number)


class Capture:
    """The bytes seen in each direction per connection, appended to by the relay threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections = 0
        self.to_tpm: dict[Stream, bytearray] = {}
        self.from_tpm: dict[Stream, bytearray] = {}

    def new_stream(self, role: str) -> Stream:
        with self._lock:
            self._connections += 1
            return role, self._connections

    def record(self, direction: dict[Stream, bytearray], stream: Stream, data: bytes) -> None:
        with self._lock:
            direction.setdefault(stream, bytearray()).extend(data)

    def everything(self) -> bytes:
        with self._lock:
            return b"\0".join(
                bytes(part) for part in (*self.to_tpm.values(), *self.from_tpm.values())
            )

    def exchanges(self) -> list[tuple[bytes, bytes]]:
        """Every (command, response) pair of TPM messages on the command-port streams."""
        with self._lock:
            streams = [
                (bytes(sent), bytes(self.from_tpm.get(stream, b"")))
                for stream, sent in self.to_tpm.items()
                if stream[0] == "command"
            ]
        return [
            pair
            for sent, answered in streams
            for pair in zip(messages(sent), messages(answered), strict=True)
        ]


def messages(stream: bytes) -> list[bytes]:
    """Split a byte stream into TPM commands or responses by the size in each header."""
    found = []
    offset = 0
    while offset + _HEADER_BYTES <= len(stream):
        size = max(int.from_bytes(stream[offset + 2 : offset + 6], "big"), _HEADER_BYTES)
        found.append(stream[offset : offset + size])
        offset += size
    return found


def code(message: bytes) -> int:
    return int.from_bytes(message[6:10], "big")


def tpm2b_at(message: bytes, offset: int) -> tuple[bytes, int]:
    size = int.from_bytes(message[offset : offset + 2], "big")
    return message[offset + 2 : offset + 2 + size], offset + 2 + size


@dataclass(frozen=True)
class SniffedDuplicate:
    """What a sniffer reads of one TPM2_Duplicate and of the session that authorized it."""

    key_in: bytes  # encryptionKeyIn as it crossed the interface
    duplicate: bytes
    nonce_caller: bytes  # in the command's authorization area
    nonce_tpm: bytes  # from the TPM2_StartAuthSession that returned the session's handle


def parameters_at(response: bytes, handles: int) -> int:
    """Where a response's parameters start: after its handles and, with sessions, a size."""
    offset = _HEADER_BYTES + 4 * handles
    return offset + 4 if response[:2] == _TPM_ST_SESSIONS.to_bytes(2, "big") else offset


def sniffed_duplicates(capture: Capture) -> list[SniffedDuplicate]:
    # The keygen's policy session appears in no authorization area between its start and
    # TPM2_Duplicate (PolicyCommandCode takes it as a handle), so its nonceTPM is still the one
    # TPM2_StartAuthSession returned.
    nonces_tpm: dict[bytes, bytes] = {}
    found = []
    for command, response in capture.exchanges():
        if code(command) == TPM2_CC.StartAuthSession and code(response) == 0:
            handle = response[_HEADER_BYTES : _HEADER_BYTES + 4]
            nonces_tpm[handle], _ = tpm2b_at(response, parameters_at(response, 1))
        elif code(command) == TPM2_CC.Duplicate:
            handles_end = _HEADER_BYTES + 4 * _DUPLICATE_HANDLES
            auth_size = int.from_bytes(command[handles_end : handles_end + 4], "big")
            session = command[handles_end + 4 : handles_end + 8]
            nonce_caller, _ = tpm2b_at(command, handles_end + 8)
            key_in, _ = tpm2b_at(command, handles_end + 4 + auth_size)
            _, offset = tpm2b_at(response, parameters_at(response, 0))  # encryptionKeyOut
            duplicate, _ = tpm2b_at(response, offset)
            found.append(
                SniffedDuplicate(key_in, duplicate, nonce_caller, nonces_tpm.get(session, b""))
            )
    return found


def kdfa_sha256(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """TPM 2.0 part 1, 11.4.10.2: SP 800-108 counter mode with HMAC-SHA-256."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hmac.digest(
            key,
            counter.to_bytes(4, "big")
            + label
            + b"\0"
            + context_u
            + context_v
            + bits.to_bytes(4, "big"),
            "sha256",
        )
    return out[: bits // 8]


def key_as_sent(sniffed: SniffedDuplicate) -> bytes:
    return sniffed.key_in


def key_from_an_unsalted_session(sniffed: SniffedDuplicate) -> bytes:
    """``encryptionKeyIn`` deciphered as if the session had no salt and no bind.

    Such a session's key is empty, so its parameter-encryption key and IV follow from the
    nonces on the wire alone (part 1, 21.3: KDFa(sessionKey || authValue, "CFB", nonceCaller,
    nonceTPM), and the key has no authValue).
    """
    derived = kdfa_sha256(b"", b"CFB", sniffed.nonce_caller, sniffed.nonce_tpm, 256)
    decryptor = Cipher(algorithms.AES(derived[:16]), CFB(derived[16:])).decryptor()
    return decryptor.update(sniffed.key_in) + decryptor.finalize()


class Relay:
    """Forward one listening port to ``target``, recording the traffic into ``capture``."""

    def __init__(self, role: str, listener: socket.socket, target: int, capture: Capture):
        self._role = role
        self._listener = listener
        self._target = target
        self._capture = capture
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        self._listener.settimeout(_ACCEPT_POLL_S)
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection((HOST, self._target))
            self._sockets += [client, server]
            stream = self._capture.new_stream(self._role)
            for source, sink, direction in (
                (client, server, self._capture.to_tpm),
                (server, client, self._capture.from_tpm),
            ):
                pump = threading.Thread(
                    target=self._pump, args=(source, sink, direction, stream), daemon=True
                )
                self._threads.append(pump)
                pump.start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        direction: dict[Stream, bytearray],
        stream: Stream,
    ) -> None:
        try:
            while data := source.recv(_CHUNK_BYTES):
                self._capture.record(direction, stream, data)
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            return  # stop() shut the sockets down

    def stop(self) -> None:
        self._stopping.set()
        self._accepter.join()
        self._listener.close()
        for sock in self._sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join()
        for sock in self._sockets:
            sock.close()


def listener_pair() -> tuple[socket.socket, socket.socket]:
    """Listening sockets on two consecutive ports: the swtpm TCTI uses ``port + 1`` for control."""
    for _ in range(50):
        first = socket.create_server((HOST, 0))
        port: int = first.getsockname()[1]
        try:
            second = socket.create_server((HOST, port + 1))
        except OSError:
            first.close()
            continue
        return first, second
    raise RuntimeError("no two consecutive free ports")


def swtpm_port(tcti: str) -> int:
    options = dict(option.split("=", 1) for option in tcti.split(":", 1)[1].split(","))
    return int(options["port"])


@pytest.fixture(scope="module")
def exported(swtpm_tcti: str) -> tuple[list[bytes], Capture]:
    """Export ``KEYS`` keys through a recording relay to swtpm: their scalars and the capture.

    Each key is checked as it comes: it signs, and its signature verifies under the public
    key the TPM reported.
    """
    capture = Capture()
    target = swtpm_port(swtpm_tcti)
    command, control = listener_pair()
    scalars = []
    with ExitStack() as stack:
        for role, listener, port in (
            ("command", command, target),
            ("control", control, target + 1),
        ):
            relay = Relay(role, listener, port, capture)
            stack.callback(relay.stop)
        with Tpm(f"swtpm:host={HOST},port={command.getsockname()[1]}") as tpm:
            for _ in range(KEYS):
                with tpm.create_exportable_p256() as key:
                    scalars.append(bytes(key.private_scalar))
                    private = ec.derive_private_key(
                        int.from_bytes(key.private_scalar, "big"), ec.SECP256R1()
                    )
                    signature = private.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
                    key.public_key().verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
    return scalars, capture


def encodings(scalar: bytes) -> dict[str, bytes]:
    """Every form in which a 32-byte scalar could plausibly travel."""
    forms = {"big-endian": scalar, "little-endian": scalar[::-1]}
    for name, raw in (("big-endian", scalar), ("little-endian", scalar[::-1])):
        forms[f"hex {name}"] = raw.hex().encode()
        forms[f"HEX {name}"] = raw.hex().upper().encode()
        # The first 30 bytes (a multiple of 3) encode the same wherever the scalar ends.
        forms[f"base64 {name}"] = base64.b64encode(raw[:30])
        forms[f"base64url {name}"] = base64.urlsafe_b64encode(raw[:30])
    return forms


def leaks(scalars: list[bytes], seen: bytes) -> list[str]:
    return [
        form for scalar in scalars for form, encoded in encodings(scalar).items() if encoded in seen
    ]


def test_a_sniffer_of_the_tpm_interface_never_sees_the_scalar(
    exported: tuple[list[bytes], Capture],
) -> None:
    scalars, capture = exported
    # The capture is the export: the relay carried every TPM2_Duplicate and its answer.
    duplicates = [pair for pair in capture.exchanges() if code(pair[0]) == TPM2_CC.Duplicate]
    assert len(duplicates) == KEYS
    assert all(code(response) == 0 for _, response in duplicates)
    assert leaks(scalars, capture.everything()) == [], "the scalar crossed the TPM interface"


@pytest.mark.parametrize("guess", [key_as_sent, key_from_an_unsalted_session])
def test_the_inner_wrapper_key_on_the_wire_opens_nothing(
    exported: tuple[list[bytes], Capture], guess: Callable[[SniffedDuplicate], bytes]
) -> None:
    # A sniffer that knows the inner-wrapper layout deciphers each duplicate with the
    # encryptionKeyIn it read, taken as sent or deciphered with a key the nonces give.
    scalars, capture = exported
    duplicates = sniffed_duplicates(capture)
    assert len(duplicates) == KEYS
    opened = b""
    for sniffed in duplicates:
        assert len(sniffed.key_in) == 16, "the duplicate has no AES-128 inner wrapper"
        assert sniffed.nonce_tpm, "the session that authorized TPM2_Duplicate was not seen"
        decryptor = Cipher(algorithms.AES(guess(sniffed)), CFB(bytes(16))).decryptor()
        opened += decryptor.update(sniffed.duplicate) + decryptor.finalize()
    assert leaks(scalars, opened) == [], "the inner wrapper's key was readable on the interface"
