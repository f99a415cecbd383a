"""The timed steps inside a request, shared by tracing (a child span each) and metrics (a
latency histogram each) so that neither of those modules imports the other."""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class Stage(StrEnum):
    """The timed steps inside a request: each gets a child span and a latency histogram."""

    VAULT_FETCH = "vault_fetch"
    UNSEAL = "unseal"
    TPM = "tpm"
    SIGN = "sign"


class StageTimer(Protocol):
    """Where a stage's duration is recorded (``workers.observability.metrics.Metrics`` is one)."""

    def observe_stage(self, stage: Stage, seconds: float) -> None:
        """Record that ``stage`` took ``seconds``."""
