"""``ops/up`` as a newcomer runs it: what it says when the broker is elsewhere and unreachable,
and where ``zandd`` is once the machine is ready."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

OPS_UP = Path(__file__).resolve().parents[2] / "ops" / "up"
PASSWORD = "s3cret-pw"


def _ops_up(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    # The venv of this test run, ready (ops/test made it so); the PATH without it, as a new
    # shell has it.
    bin_dir = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != bin_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZANDD_", "VIRTUAL_ENV"))}
    env.update(PATH=path, ZANDD_VENV=sys.prefix, ZANDD_AMQP_URL=url)
    return subprocess.run(
        [str(OPS_UP), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_an_unreachable_broker_url_is_shown_redacted() -> None:
    result = _ops_up(url=f"amqp://svc:{PASSWORD}@broker.invalid:5672/zandd")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "zandd ops: no broker answers at amqp://svc:***@broker.invalid:5672/zandd: start it, "
        "or set ZANDD_AMQP_URL to a broker that runs"
    )
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.rabbitmq
def test_it_says_how_to_get_zandd_on_the_path(empty_amqp_url: str) -> None:
    result = _ops_up("--help", url=empty_amqp_url)
    assert result.returncode == 0, result.stderr
    assert (
        f"zandd ops: zandd is {sys.prefix}/bin/zandd; to have it on your PATH in another shell: "
        f"source {sys.prefix}/bin/activate"
    ) in result.stderr
    assert result.stdout.startswith("usage: zandd up")
