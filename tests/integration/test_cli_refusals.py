"""A broker that refuses ``zandd`` at connect: one redacted sentence naming the cause, for every
command and every connection path (the lean connection, aio-pika's and aiormq's)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from yarl import URL

from tests.support.broker import broker_users, full_permissions
from tests.support.cli import environment, zandd
from workers.commands.base import EXIT_FAILURE, EXIT_PERMANENT

#: One command per way ``zandd`` reaches the broker: ``health`` (aio-pika, then the lean
#: connection), ``dead list`` (lean), ``up`` (aio-pika's robust connection), the signer on
#: each transport, ``bench --attach`` (aio-pika) and the client (``keys create``).
COMMANDS = [
    ("health",),
    ("dead", "list"),
    ("up", "--signers", "1"),
    ("signer",),
    ("signer", "--transport", "aiormq"),
    ("bench", "--attach"),
    ("keys", "create"),
    ("topology",),
]


async def _refused(args: tuple[str, ...], url: str, tmp_path: Path) -> str:
    """Run ``zandd args`` against ``url``; assert one line, the exit code, no secret; the line.

    A worker exits 3 (``EXIT_PERMANENT``: a configuration error, so ``zandd up`` stops the
    fleet at once instead of restarting it); every other command exits 1.
    """
    env = environment(ZANDD_AMQP_URL=url, ZANDD_DATA_DIR=str(tmp_path))
    if "--transport" in args:
        args = tuple(arg for arg in args if arg not in ("--transport", "aiormq"))
        env["ZANDD_TRANSPORT"] = "aiormq"
    if args[0] == "signer":
        code, _, err = await zandd("vault", "init", "--plaintext", env=env)
        assert code == 0, err
    code, out, err = await zandd(*args, env=env)
    assert code == (EXIT_PERMANENT if args[0] == "signer" else EXIT_FAILURE), out + err
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    password = URL(url).password
    assert password is not None
    assert f":{password}@" not in out + err
    return line


@pytest.mark.rabbitmq
@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
async def test_a_missing_vhost_is_named_with_the_fix(args: tuple[str, ...], tmp_path: Path) -> None:
    vhost = f"zandd-missing-{uuid.uuid4().hex[:8]}"
    line = await _refused(args, f"amqp://guest:guest@127.0.0.1:5672/{vhost}", tmp_path)
    assert line == (
        f"zandd: the broker at amqp://guest:***@127.0.0.1:5672/{vhost} has no vhost '{vhost}' "
        f"(530 NOT_ALLOWED - vhost {vhost} not found): create it (rabbitmqctl add_vhost "
        f"{vhost}) or fix the vhost in the URL"
    )


@pytest.mark.rabbitmq
@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
async def test_a_vhost_the_user_may_not_use_is_named_with_the_fix(
    args: tuple[str, ...], empty_amqp_url: str, tmp_path: Path
) -> None:
    name = f"zt-stranger-{uuid.uuid4().hex[:8]}"
    # The user has rights in the test's vhost only; the default vhost "/" is not theirs.
    with broker_users(empty_amqp_url, [name], full_permissions) as urls:
        url = str(URL(urls[name]).with_path("/"))
        line = await _refused(args, url, tmp_path)
    assert line.startswith(f"zandd: the broker at amqp://{name}:***@")
    assert f"refused user '{name}' on vhost '/' (530 NOT_ALLOWED - access to vhost '/' " in line
    assert line.endswith(
        f"check that the vhost exists and the user may use it (rabbitmqctl list_vhosts; "
        f"rabbitmqctl list_user_permissions {name}) or fix the URL"
    )


@pytest.mark.rabbitmq
@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
async def test_wrong_credentials_are_named_with_the_fix(
    args: tuple[str, ...], empty_amqp_url: str, tmp_path: Path
) -> None:
    url = str(URL(empty_amqp_url).with_password("not-the-password"))
    line = await _refused(args, url, tmp_path)
    assert line.startswith("zandd: the broker at amqp://guest:***@")
    assert "refused our credentials (user 'guest')" in line
    assert line.endswith("check the user and password in the URL")


@pytest.mark.rabbitmq
@pytest.mark.tpm
async def test_the_keygen_worker_names_a_missing_vhost(swtpm_tcti: str, tmp_path: Path) -> None:
    vhost = f"zandd-missing-{uuid.uuid4().hex[:8]}"
    env = environment(
        ZANDD_AMQP_URL=f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
        ZANDD_DATA_DIR=str(tmp_path),
        ZANDD_TPM_TCTI=swtpm_tcti,
    )
    code, _, err = await zandd("vault", "init", "--plaintext", env=env)
    assert code == 0, err
    code, _, err = await zandd("keygen-worker", env=env)
    assert code == EXIT_PERMANENT
    assert "Traceback" not in err
    # A worker logs its start (the TPM, the ring) at INFO; the refusal is its last line.
    line = err.strip().splitlines()[-1]
    assert line.endswith(
        f"has no vhost '{vhost}' (530 NOT_ALLOWED - vhost {vhost} not found): "
        f"create it (rabbitmqctl add_vhost {vhost}) or fix the vhost in the URL"
    )
