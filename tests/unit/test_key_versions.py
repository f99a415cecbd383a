"""Key versions (issue 15) without a fleet: the wire models of key.rotate, key.update and
key.public's all_versions, what key.update changes on each version, the CLI's periods."""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import UTC, datetime, timedelta

import pytest

from contracts.errors import InvalidRequest
from contracts.models import (
    KeyCreateReply,
    KeyCreateRequest,
    KeyPublicReply,
    KeyPublicRequest,
    KeyRotateRequest,
    KeyUpdateRequest,
    parse_request,
)
from contracts.operations import IDEMPOTENT_OPERATIONS, KEYGEN_OPERATIONS, Operation
from contracts.topology import KEYGEN_QUEUE, QUEUE_OPERATIONS
from vault.records import KeyRecord, KeyState
from vault.sealing import SealedKey
from workers.commands.versions import describe_period, rotation_period
from workers.keygen.versions import _updated

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
DAY_S = 86_400


def test_the_new_operations_go_to_the_single_keygen_worker() -> None:
    for operation in (Operation.KEY_ROTATE, Operation.KEY_UPDATE):
        assert operation in KEYGEN_OPERATIONS
        assert operation in QUEUE_OPERATIONS[KEYGEN_QUEUE]
    assert Operation.KEY_ROTATE in IDEMPOTENT_OPERATIONS
    assert Operation.KEY_UPDATE not in IDEMPOTENT_OPERATIONS


def test_key_rotate_takes_a_key_id_only() -> None:
    assert parse_request(Operation.KEY_ROTATE, b'{"key_id": "zk-1"}') == KeyRotateRequest(
        key_id="zk-1"
    )
    with pytest.raises(InvalidRequest, match="version"):
        parse_request(Operation.KEY_ROTATE, b'{"key_id": "zk-1", "version": 2}')


@pytest.mark.parametrize("period", [DAY_S, 3650 * DAY_S])
def test_rotation_periods_within_bounds(period: int) -> None:
    body = json.dumps({"rotation_period": period}).encode()
    assert parse_request(Operation.KEY_CREATE, body) == KeyCreateRequest(rotation_period=period)


@pytest.mark.parametrize("period", [DAY_S - 1, 3650 * DAY_S + 1, 0, -1, 2**63, "86400", 1.5e5])
def test_rotation_periods_out_of_bounds_or_not_integers_are_refused(period: object) -> None:
    for operation, body in (
        (Operation.KEY_CREATE, {"rotation_period": period}),
        (Operation.KEY_UPDATE, {"key_id": "zk-1", "rotation_period": period}),
    ):
        with pytest.raises(InvalidRequest, match="rotation_period"):
            parse_request(operation, json.dumps(body).encode())


def test_key_update_tells_left_out_from_null() -> None:
    request = parse_request(Operation.KEY_UPDATE, b'{"key_id": "k", "label": null}')
    assert isinstance(request, KeyUpdateRequest)
    assert request.changes == {"label"}
    every = parse_request(
        Operation.KEY_UPDATE,
        b'{"key_id": "k", "label": "x", "allowed_signers": null, "rotation_period": null}',
    )
    assert isinstance(every, KeyUpdateRequest)
    assert every.changes == {"label", "allowed_signers", "rotation_period"}
    with pytest.raises(InvalidRequest, match="at least one of"):
        parse_request(Operation.KEY_UPDATE, b'{"key_id": "k"}')
    with pytest.raises(InvalidRequest, match="allowed_signers"):
        parse_request(Operation.KEY_UPDATE, b'{"key_id": "k", "allowed_signers": ["a\\u0000"]}')
    # What the Python client sends: the fields given, null included, nothing else.
    body = KeyUpdateRequest(key_id="k", label=None).model_dump_json(exclude_unset=True)
    assert json.loads(body) == {"key_id": "k", "label": None}


def test_key_public_all_versions_excludes_a_version() -> None:
    assert parse_request(
        Operation.KEY_PUBLIC, b'{"key_id": "k", "all_versions": true}'
    ) == KeyPublicRequest(key_id="k", all_versions=True)
    with pytest.raises(InvalidRequest, match="exclude each other"):
        parse_request(Operation.KEY_PUBLIC, b'{"key_id": "k", "version": 1, "all_versions": true}')
    with pytest.raises(InvalidRequest, match="all_versions"):
        parse_request(Operation.KEY_PUBLIC, b'{"key_id": "k", "all_versions": 1}')


def test_replies_of_older_servers_still_read() -> None:
    # Old producers keep working and new clients read old servers: the fields are optional.
    jwk = {"kty": "EC", "crv": "P-256", "x": "x", "y": "y", "kid": "k.v1"}
    old_public = {
        "key_id": "k",
        "version": 1,
        "algorithm": "ecdsa-p256-sha256",
        "public_key_pem": "pem",
        "public_key_jwk": jwk,
    }
    assert KeyPublicReply.model_validate(old_public).versions is None
    old_create = {**old_public, "created_at": NOW.isoformat()}
    del old_create["public_key_jwk"]
    created = KeyCreateReply.model_validate(old_create)
    assert (created.rotation_period, created.next_rotation_at) == (None, None)


def _record(version: int, **changes: object) -> KeyRecord:
    record = KeyRecord(
        key_id="zk-1",
        version=version,
        algorithm="ecdsa-p256-sha256",
        public_key_der=b"der",
        sealed=SealedKey("kek-1", os.urandom(12), os.urandom(48)),
        state=KeyState.ENABLED,
        label="old",
        allowed_signers=("alice", "bob"),
        created_at=NOW - timedelta(days=10),
        created_by="alice",
        request_id=None,
        rotation_period_s=30 * DAY_S,
        next_rotation_at=NOW + timedelta(days=20) if version == 2 else None,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def test_update_changes_what_it_names_on_every_version_and_schedules_on_the_primary() -> None:
    v1, v2 = _record(1), _record(2)
    request = KeyUpdateRequest(key_id="zk-1", allowed_signers=None, rotation_period=DAY_S)
    new_v1, new_v2 = (_updated(r, request, v2, NOW) for r in (v1, v2))
    assert (new_v1.label, new_v1.allowed_signers, new_v1.rotation_period_s) == (
        "old",
        ("alice",),
        DAY_S,
    )
    assert new_v1.next_rotation_at is None
    assert new_v2.next_rotation_at == NOW + timedelta(days=1)
    # Without a new period the primary keeps its schedule; "none" takes it away.
    keep = _updated(v2, KeyUpdateRequest(key_id="zk-1", label="new"), v2, NOW)
    assert (keep.label, keep.next_rotation_at) == ("new", v2.next_rotation_at)
    stop = _updated(v2, KeyUpdateRequest(key_id="zk-1", rotation_period=None), v2, NOW)
    assert (stop.rotation_period_s, stop.next_rotation_at) == (None, None)
    # An older version left with a schedule (an interrupted rotation) loses it.
    stale = _record(1, next_rotation_at=NOW)
    assert (
        _updated(stale, KeyUpdateRequest(key_id="zk-1", label=None), v2, NOW).next_rotation_at
        is None
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90d", 90 * DAY_S),
        ("12w", 84 * DAY_S),
        ("1y", 365 * DAY_S),
        ("86400", DAY_S),
        ("24h", DAY_S),
        ("none", None),
        ("NONE", None),
    ],
)
def test_cli_rotation_periods(text: str, seconds: int | None) -> None:
    assert rotation_period(text) == seconds


@pytest.mark.parametrize("text", ["1h", "0d", "3651d", "90 days", "-1d", "", "1e5"])
def test_cli_rotation_periods_refused(text: str) -> None:
    with pytest.raises(ValueError, match="'"):
        rotation_period(text)


def test_cli_describes_periods() -> None:
    assert (describe_period(None), describe_period(90 * DAY_S), describe_period(DAY_S + 1)) == (
        "none",
        "90d",
        "86401s",
    )
