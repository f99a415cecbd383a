"""The test MongoDB: whether a container can start here, and database URLs on the server."""

from __future__ import annotations

import gc
import os
import warnings

MONGO_IMAGE = os.environ.get("ZANDD_TEST_MONGO_IMAGE", "mongo:7.0")
"""The image of the MongoDB container started when ZANDD_TEST_MONGO_URL is not set."""


def docker_unavailable() -> str | None:
    """Why no Docker engine can start a MongoDB container here; None when one answers."""
    try:
        import docker
        import requests
        from testcontainers.community.mongodb import MongoDbContainer  # noqa: F401
    except ImportError as exc:
        return f"testcontainers >= 4.15 is not installed ({exc.name}): pip install 'zandd-hsm[dev]'"
    # docker-py leaves the socket of a failed probe to the garbage collector.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=10)
            try:
                client.ping()
            finally:
                client.close()
        except (docker.errors.DockerException, requests.RequestException) as exc:
            return f"no Docker engine answers ({exc})"
        finally:
            gc.collect()
    return None


def mongo_database_url(server_url: str, database: str) -> str:
    """``server_url`` naming ``database``, still authenticating where ``server_url`` did."""
    base, _, query = server_url.partition("?")
    scheme, _, rest = base.partition("://")
    hosts, _, auth_database = rest.partition("/")
    options = [option for option in query.split("&") if option]
    has_auth_source = any(o.lower().startswith("authsource=") for o in options)
    if "@" in hosts and not has_auth_source:
        # Credentials are checked against the URL's database unless authSource says otherwise.
        options.append(f"authSource={auth_database or 'admin'}")
    return f"{scheme}://{hosts}/{database}" + ("?" + "&".join(options) if options else "")
