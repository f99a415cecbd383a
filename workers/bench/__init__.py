"""``zandd bench``: the fleet measured beside a plain aio-pika echo, the TPM and the raw crypto.

One run, on one broker, with the client code users run: ``echo`` (the do-nothing reference),
``sign``, ``batch`` and ``keygen`` through the queues, and ``tpm_only``, ``hybrid`` and
``crypto_limit`` in process. :func:`workers.bench.runner.run_bench` drives it;
:mod:`workers.bench.report` turns the measurements into the table and the JSON object.
"""
