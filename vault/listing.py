"""Paging through keys (``key.list``): the query every store answers the same way.

A page holds the *current* version of each key — its highest version — that matches, in key
id order, after the key id ``after`` (keyset paging: a page costs what it holds, not what
came before it, and keys created meanwhile never make a page repeat or skip one that
existed throughout). ``owner`` matches the current version's ``created_by``; ``signer``
matches when the current version's ``allowed_signers`` name it or ``*``; ``label`` exactly;
``state`` the current version's state. A store may return a short page (even an empty one)
with ``next_after`` set when it stopped after examining ``MAX_EXAMINED`` rows: only a page
without ``next_after`` is the last.
"""

from __future__ import annotations

from dataclasses import dataclass

from vault.records import KeyRecord, KeyState

#: The most candidate rows a store examines for one page before it returns what it has.
MAX_EXAMINED = 5000


@dataclass(frozen=True, slots=True)
class KeyListQuery:
    """Which keys one page holds (see the module docstring)."""

    limit: int
    after: str | None = None
    owner: str | None = None
    signer: str | None = None
    label: str | None = None
    state: KeyState | None = None

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("a key page holds at least one key")

    def matches(self, record: KeyRecord) -> bool:
        """Whether ``record`` (a key's current version) belongs in the listing."""
        if self.owner is not None and record.created_by != self.owner:
            return False
        if self.signer is not None and not {self.signer, "*"} & set(record.allowed_signers):
            return False
        if self.label is not None and record.label != self.label:
            return False
        return self.state is None or record.state == self.state


@dataclass(frozen=True, slots=True)
class KeyPage:
    """One page: current versions in key id order, and where the next page starts (None on
    the last page)."""

    records: list[KeyRecord]
    next_after: str | None
