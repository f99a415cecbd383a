"""Process hardening seen from inside a process: a prelude that notes when key material enters."""

# Notes, each time KEK material enters the process (a ring is loaded or created) and each time
# a key is opened, whether the process could then be dumped; ``seen`` holds the notes.
WATCH_KEY_MATERIAL = """
import ctypes, json, resource, sys
import vault.kek, vault.opening, vault.rewrap

libc = ctypes.CDLL(None)
seen = []

def watched(name, fn):
    def call(*args, **kwargs):
        seen.append([name, libc.prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE)])
        return fn(*args, **kwargs)
    return call

for name in ("load", "create"):
    method = getattr(vault.kek.KekRing, name).__func__
    setattr(vault.kek.KekRing, name, classmethod(watched(name, method)))
for module in (vault.opening, vault.rewrap):
    module.open_into = watched("open", module.open_into)
"""
