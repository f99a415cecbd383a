"""ops/lib.sh keeps the broker password off command lines and out of what it prints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.net import free_port

LIB = Path(__file__).resolve().parents[2] / "ops" / "lib.sh"
PASSWORD = "s3cret-pw"


def _lib(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` after sourcing lib.sh, with a PATH of only ``dirname``.

    Nothing else is on the PATH, so no step can find (and start) a real rabbitmq-server.
    """
    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    dirname = shutil.which("dirname")
    assert dirname is not None
    (tools / "dirname").symlink_to(dirname)
    bash = shutil.which("bash")
    assert bash is not None
    return subprocess.run(
        [bash, "-c", f'source "{LIB}"; {script}'],
        capture_output=True,
        text=True,
        env={"PATH": str(tools), "ZANDD_VENV": sys.prefix, **env},
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"amqp://svc:{PASSWORD}@mq:5672/zandd", "amqp://svc:***@mq:5672/zandd"),
        # Split at the last @, like contracts.urls.redact_url: an @ in the password stays hidden.
        (
            f"amqps://svc:{PASSWORD}@x@mq/zandd?cafile=/ca.pem",
            "amqps://svc:***@mq/zandd?cafile=/ca.pem",
        ),
        # A "#" in the password: the old reachability check read the password as the port.
        (f"amqp://svc:{PASSWORD}#1@mq/", "amqp://svc:***@mq/"),
        (f"amqp://svc:{PASSWORD}@h1,h2:5673/", "amqp://svc:***@h1,h2:5673/"),
        ("amqp://mq:5672/", "amqp://mq:5672/"),
    ],
)
def test_the_url_is_shown_without_its_password(url: str, shown: str, tmp_path: Path) -> None:
    result = _lib("shown_amqp_url", tmp_path, ZANDD_AMQP_URL=url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == shown + "\n"


def test_an_unreachable_broker_is_named_without_password_and_checked_via_the_env(
    tmp_path: Path,
) -> None:
    # A stand-in venv whose python notes its command line, then runs the real one.
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    argv_log = tmp_path / "argv.log"
    python = venv_bin / "python"
    python.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$0" "$@" >>"{argv_log}"\nexec "{sys.executable}" "$@"\n'
    )
    python.chmod(0o755)
    url = f"amqp://svc:{PASSWORD}@127.0.0.1:{free_port()}/"
    result = _lib(
        "ensure_rabbitmq",
        tmp_path,
        ZANDD_AMQP_URL=url,
        ZANDD_VENV=str(tmp_path / "venv"),
        HOME=os.environ.get("HOME", "/"),
    )
    assert result.returncode == 1
    assert "no broker at amqp://svc:***@127.0.0.1:" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
    ran = argv_log.read_text()
    assert ran, "the reachability check ran"
    assert PASSWORD not in ran


def test_the_url_reaches_zandd_up_through_the_environment(tmp_path: Path) -> None:
    # ops/up runs `zandd up "$@"`: the URL lib.sh checked must be exported for zandd to see it.
    child = f"{sys.executable} -c 'import os; print(os.environ[\"ZANDD_AMQP_URL\"])'"
    result = _lib(child, tmp_path)
    assert result.stdout == "amqp://guest:guest@localhost:5672/\n", result.stderr


@pytest.mark.parametrize(
    ("url", "said"),
    [
        # Elsewhere: no local rabbitmq-server is started for it, whatever this machine has.
        (
            f"amqp://svc:{PASSWORD}#x@broker.invalid:5672/",
            "zandd ops: no broker answers at amqp://svc:***@broker.invalid:5672/: start it, or "
            "set ZANDD_AMQP_URL to a broker that runs",
        ),
        (
            f"amqp://svc:{PASSWORD}@mq:99999/",
            "zandd ops: ZANDD_AMQP_URL: a broker port is not a port number in "
            "amqp://svc:***@mq:99999/",
        ),
    ],
)
def test_a_remote_or_malformed_url_is_one_redacted_line(
    url: str, said: str, tmp_path: Path
) -> None:
    result = _lib("ensure_rabbitmq", tmp_path, ZANDD_AMQP_URL=url)
    assert (result.returncode, result.stderr) == (1, said + "\n")
    assert PASSWORD not in result.stdout


def test_where_zandd_is_said_unless_it_is_on_the_path(tmp_path: Path) -> None:
    result = _lib("say_where_zandd_is", tmp_path)
    assert result.stderr == (
        f"zandd ops: zandd is {sys.prefix}/bin/zandd; to have it on your PATH in another "
        f"shell: source {sys.prefix}/bin/activate\n"
    )
    again = tmp_path / "again"
    again.mkdir()
    on_path = _lib(f'PATH="{sys.prefix}/bin:$PATH"; say_where_zandd_is', again)
    assert (on_path.returncode, on_path.stderr) == (0, "")
