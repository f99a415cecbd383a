"""Running ``zandd`` as an operator would: a subprocess with only the ZANDD_ variables given."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

ZANDD = [sys.executable, "-m", "workers.cli"]
"""The ``zandd`` command of the code under test."""


def environment(**values: str) -> dict[str, str]:
    """This process's environment without any ZANDD_ variable, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZANDD_")}
    env.update(values)
    return env


async def zandd(*args: str, env: dict[str, str], timeout_s: float = 60.0) -> tuple[int, str, str]:
    """Run ``zandd`` without blocking the event loop (the in-process fleet must keep serving)."""
    process = await asyncio.create_subprocess_exec(
        *ZANDD, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def run_zandd(
    *args: str, env: dict[str, str], timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``zandd`` to completion, blocking (for tests with no event loop to keep serving)."""
    return subprocess.run(
        [*ZANDD, *args], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
