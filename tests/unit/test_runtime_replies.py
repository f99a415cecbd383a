"""What an error reply tells the caller: their mistakes in full, our failures in one sentence."""

from __future__ import annotations

import json

from contracts.errors import (
    ConfigurationError,
    Forbidden,
    TpmUnavailable,
    VaultUnavailable,
    ZanddError,
)
from workers.runtime import _error_outcome


def reply_of(error: ZanddError) -> dict[str, object]:
    outcome = _error_outcome(error)
    body: dict[str, object] = json.loads(outcome.body)
    return body


def test_our_failures_do_not_leak_paths_urls_or_tpm_codes() -> None:
    vault = reply_of(VaultUnavailable("SQLite vault /srv/zandd/vault.db failed: SQLITE_BUSY"))
    tpm = reply_of(TpmUnavailable("cannot open the TPM through TCTI 'swtpm:host=10.1.2.3'"))
    config = reply_of(ConfigurationError("KEK file /etc/zandd/kek-ring.json does not exist"))
    assert vault == {
        "code": "vault_unavailable",
        "message": "the key vault is unavailable; try again later",
        "retryable": True,
    }
    assert tpm["message"] == "the TPM is unavailable; try again later"
    assert config["code"] == "internal"
    assert "/etc/zandd" not in str(config["message"])


def test_the_callers_own_refusals_are_explained() -> None:
    reply = reply_of(Forbidden("app-2 may not sign with key zk-1"))
    assert reply == {
        "code": "forbidden",
        "message": "app-2 may not sign with key zk-1",
        "retryable": False,
    }
