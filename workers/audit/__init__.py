"""Audit entries of requests, keyed appends, the published head and TPM-signed checkpoints."""
