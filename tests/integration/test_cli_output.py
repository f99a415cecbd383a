"""What ``zandd`` prints, for people and for programs: ``--version``, ``--json``, each
subcommand's own flags, and a reader that stops reading (``zandd keys list | head``)."""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from tests.support.cli import ZANDD, environment, run_zandd, zandd
from tests.support.fleet import RunningFleet


def _into_a_closed_pipe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``zandd`` with stdout a pipe nobody reads any more (``| head`` after its lines)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [*ZANDD, *args],
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [("keys", "list"), ("audit", "tail"), ("--help",), ("--version",)])
def test_a_reader_that_stops_reading_is_no_error(args: tuple[str, ...], tmp_path: Path) -> None:
    env = environment(ZANDD_DATA_DIR=str(tmp_path))
    assert run_zandd("vault", "init", "--plaintext", env=env).returncode == 0
    result = _into_a_closed_pipe(*args, env=env)
    assert (result.returncode, result.stderr) == (0, "")


def test_version_is_the_installed_package_s() -> None:
    result = run_zandd("--version", env=environment())
    assert (result.returncode, result.stdout) == (0, f"zandd {metadata.version('zandd-hsm')}\n")


def _flags(*command: str) -> set[str]:
    result = run_zandd(*command, "--help", env=environment())
    assert result.returncode == 0, result.stderr
    return {word.strip("[],") for word in result.stdout.split() if word.startswith(("--", "[--"))}


def test_each_subcommand_shows_only_the_flags_it_uses() -> None:
    serving = {"--metrics-port", "--metrics-host", "--sign-shards", "--quota-overrides"}
    vault = {"--vault-url", "--kek-file", "--data-dir"}
    logging = {"--log-level", "--log-format"}
    assert _flags("dead", "list") == {"--help", "--amqp-url", "--json", *logging}
    assert _flags("vault", "status") == {"--help", "--tpm-tcti", *vault, *logging}
    assert _flags("tpm", "check") == {"--help", "--tpm-tcti", "--data-dir", *logging}
    sign = _flags("sign")
    assert {"--amqp-url", "--timeout", "--traces-exporter"} <= sign
    assert not sign & (vault | serving)
    assert {"--amqp-url", "--tpm-tcti", *vault, *serving} <= _flags("up")
    assert _flags("topology") >= {"--amqp-url", "--sign-shards"}
    assert not _flags("topology") & vault


@pytest.mark.rabbitmq
@pytest.mark.tpm
async def test_json_output_is_one_document_or_json_lines(
    fleet: RunningFleet, tmp_path: Path
) -> None:
    # The flags still work where they are taken: the vault is the fleet's, named by a flag.
    env = environment(ZANDD_AMQP_URL=fleet.amqp_url)
    data = ("--data-dir", str(fleet.settings.data_dir))
    code, out, err = await zandd("keys", "create", "--label", "json \x1b[31m", env=env)
    assert code == 0, err
    key_id = out.split("\n", 1)[0]

    code, out, err = await zandd("keys", "list", "--json", *data, env=env)
    assert code == 0, err
    assert "\x1b" not in out  # escaped: \u001b
    [listed] = json.loads(out)
    assert listed == {
        "key_id": key_id,
        "version": 1,
        "state": "enabled",
        "owner": "guest",
        "label": "json \x1b[31m",
        "record_check": "ok",
    }

    code, out, err = await zandd("keys", "show", key_id, "--json", *data, env=env)
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["key_id"], shown["primary_version"], shown["owner"]) == (key_id, 1, "guest")
    assert [v["state"] for v in shown["versions"]] == ["enabled"]

    code, out, err = await zandd("keys", "show", key_id, "--json", "--via-broker", env=env)
    assert code == 0, err
    assert json.loads(out)["key_id"] == key_id

    code, out, err = await zandd("audit", "tail", "--json", "--key", key_id, *data, env=env)
    assert code == 0, err
    entries = [json.loads(line) for line in out.splitlines()]
    assert [(e["operation"], e["outcome"], e["key_id"]) for e in entries] == [
        ("key.create", "ok", key_id),
        ("key.describe", "ok", key_id),
    ]
    assert {"seq", "at", "principal", "prev_hash", "entry_hash"} <= set(entries[0])

    code, out, err = await zandd("dead", "list", "--json", env=env)
    assert (code, json.loads(out)) == (0, []), err

    code, out, err = await zandd("health", "--json", *data, env=env)
    report = json.loads(out)
    assert (code, report["healthy"], report["failed"]) == (0, True, None), err
    assert report["passed"][0] == "broker"


async def test_health_json_says_what_failed(tmp_path: Path) -> None:
    env = environment(
        ZANDD_AMQP_URL="amqp://guest:secret-pw@127.0.0.1:1/", ZANDD_DATA_DIR=str(tmp_path)
    )
    code, out, _ = await zandd("health", "--json", env=env)
    assert code == 1
    assert json.loads(out) == {
        "healthy": False,
        "passed": None,
        "failed": "cannot reach the broker at amqp://guest:***@127.0.0.1:1/: AMQPConnectionError",
    }
