"""What a sniffer of the TPM interface sees while the keygen worker exports a key (real swtpm).

A relay between the TPM client and swtpm records every byte both ways, on the command port
and on the control port, the way a bus or socket sniffer would.
"""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack, suppress

import pytest

pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is not installed", exc_type=ImportError)

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import TPM2_CC

from workers.keygen.tpm import Tpm

pytestmark = pytest.mark.tpm

HOST = "127.0.0.1"
MESSAGE = b"zandd export capture"
KEYS = 3
# A TPM command: tag (2 bytes), size of the whole command (4), command code (4).
_COMMAND_HEADER_BYTES = 10
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

    def command_codes(self) -> list[int]:
        """The command codes of every TPM command the client sent on a command-port stream."""
        with self._lock:
            streams = [bytes(data) for (role, _), data in self.to_tpm.items() if role == "command"]
        codes = []
        for stream in streams:
            offset = 0
            while offset + _COMMAND_HEADER_BYTES <= len(stream):
                size = int.from_bytes(stream[offset + 2 : offset + 6], "big")
                codes.append(int.from_bytes(stream[offset + 6 : offset + 10], "big"))
                offset += max(size, _COMMAND_HEADER_BYTES)
        return codes


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


@pytest.fixture
def sniffed(swtpm_tcti: str) -> Iterator[tuple[str, Capture]]:
    """A TCTI that reaches swtpm through a recording relay, and the capture."""
    capture = Capture()
    target = swtpm_port(swtpm_tcti)
    command, control = listener_pair()
    with ExitStack() as stack:
        for role, listener, port in (
            ("command", command, target),
            ("control", control, target + 1),
        ):
            relay = Relay(role, listener, port, capture)
            stack.callback(relay.stop)
        yield f"swtpm:host={HOST},port={command.getsockname()[1]}", capture


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


def test_a_sniffer_of_the_tpm_interface_never_sees_the_scalar(
    sniffed: tuple[str, Capture],
) -> None:
    tcti, capture = sniffed
    scalars = []
    with Tpm(tcti) as tpm:
        for _ in range(KEYS):
            with tpm.create_exportable_p256() as key:
                scalars.append(bytes(key.private_scalar))
                private = ec.derive_private_key(
                    int.from_bytes(key.private_scalar, "big"), ec.SECP256R1()
                )
                signature = private.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
                key.public_key().verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
    # The capture is the export: the relay carried every TPM2_Duplicate.
    assert capture.command_codes().count(TPM2_CC.Duplicate) == KEYS
    seen = capture.everything()
    leaked = [
        form for scalar in scalars for form, encoded in encodings(scalar).items() if encoded in seen
    ]
    assert leaked == [], "the scalar crossed the TPM interface"
