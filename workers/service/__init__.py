"""One worker process's wiring: settings, assembly, policy, events, quotas, the KEK ring, hardening."""
