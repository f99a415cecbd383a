"""The producers of the security tests: broker user names, unique to this test process."""

from __future__ import annotations

import uuid

SUFFIX = uuid.uuid4().hex[:8]
ALICE, BOB, CAROL, ADMIN = (f"zt-{role}-{SUFFIX}" for role in ("alice", "bob", "carol", "admin"))
