"""compose/: valid for Docker Compose, and in step with the CLI, the settings and the broker users."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from yarl import URL

from workers.cli import build_parser
from workers.service.config import Settings

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "compose" / "compose.yaml"
DOCKERFILE = ROOT / "compose" / "Dockerfile"
DEFINITIONS: dict[str, Any] = json.loads(
    (ROOT / "ops" / "rabbitmq" / "definitions.json").read_text()
)
ZANDD_TARGETS = {"keygen", "signer"}
ZANDD_IMAGES = {"zandd-hsm/keygen:dev", "zandd-hsm/signer:dev"}


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def _runs_zandd(service: dict[str, Any]) -> bool:
    """Whether the service's command goes to the image's ``zandd`` entrypoint."""
    built = service.get("build", {}).get("target") in ZANDD_TARGETS
    return (built or service.get("image") in ZANDD_IMAGES) and "entrypoint" not in service


def test_docker_compose_accepts_the_file() -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip(
            "docker-compose is not installed (ops/lib.sh installs it: apt-get install docker-compose)"
        )
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_every_zandd_command_and_healthcheck_parses_with_the_cli() -> None:
    parser = build_parser()
    checked = []
    for name, service in _services().items():
        argvs = []
        if _runs_zandd(service):
            argvs.append(service["command"])
        test = service.get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "zandd"]:
            argvs.append(test[2:])
        for argv in argvs:
            try:
                parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"service {name}: `zandd {' '.join(argv)}` does not parse")
            checked.append(name)
    assert {"keygen", "keygen-standby", "signer"} <= set(checked)


def test_every_zandd_variable_is_a_setting() -> None:
    used = set(re.findall(r"\bZANDD_[A-Z0-9_]+", COMPOSE.read_text() + DOCKERFILE.read_text()))
    known = {f"ZANDD_{field.upper()}" for field in Settings.model_fields}
    assert used, "compose sets no ZANDD_ variable?"
    assert used <= known, f"not settings: {sorted(used - known)}"


def test_every_build_target_exists_in_the_dockerfile() -> None:
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE))
    targets = {s["build"]["target"] for s in _services().values() if "build" in s}
    assert targets == {"keygen", "signer", "swtpm"}
    assert targets <= stages


def _password_matches(user: str, password: str) -> bool:
    (entry,) = [u for u in DEFINITIONS["users"] if u["name"] == user]
    assert entry["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    raw = base64.b64decode(entry["password_hash"])
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


def test_each_service_connects_as_its_own_least_privilege_user() -> None:
    vhosts = {v["name"] for v in DEFINITIONS["vhosts"]}
    users = {}
    for name, service in _services().items():
        url_text = service.get("environment", {}).get("ZANDD_AMQP_URL")
        if url_text is None:
            continue
        url = URL(url_text)
        assert url.user is not None, name
        assert url.password is not None, name
        assert url.path.lstrip("/") in vhosts, name
        assert _password_matches(url.user, url.password), f"{name}: password is not {url.user}'s"
        users[name] = url.user
    assert users == {
        "keygen": "keygen",
        "keygen-standby": "keygen",
        "signer": "signer",
        "producer": "producer",
    }


def test_the_example_producer_and_the_kek_secret_are_where_compose_says() -> None:
    producer = _services()["producer"]
    (mount,) = producer["volumes"]
    source, target, _mode = mount.split(":")
    assert (COMPOSE.parent / source).is_file()
    assert producer["entrypoint"][-1] == target
    kek = yaml.safe_load(COMPOSE.read_text())["secrets"]["kek_ring"]["file"]
    kek_path = COMPOSE.parent / kek
    ignored = (kek_path.parent / ".gitignore").read_text().splitlines()
    assert "*" in ignored, "the KEK ring directory must be git-ignored"


def test_signers_can_be_scaled() -> None:
    signer = _services()["signer"]
    # `--scale` needs containers without a fixed name or a published host port.
    assert "container_name" not in signer
    assert "ports" not in signer


CLUSTER = ROOT / "compose" / "compose.cluster.yaml"
CLUSTER_CONF = ROOT / "ops" / "rabbitmq" / "cluster" / "cluster.conf"
ADVANCED_CONFIG = ROOT / "ops" / "rabbitmq" / "cluster" / "advanced.config"


def _cluster_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(CLUSTER.read_text())["services"]
    return services


def test_docker_compose_accepts_the_cluster_profile_over_the_stack() -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip(
            "docker-compose is not installed (ops/lib.sh installs it: apt-get install docker-compose)"
        )
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "-f", str(CLUSTER), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "RABBITMQ_COOKIE": "test-cookie"},
    )
    assert result.returncode == 0, result.stderr


def test_every_broker_node_is_configured_as_a_cluster_member() -> None:
    services = {**_services(), **_cluster_services()}
    nodes = [name for name in services if name.startswith("rabbitmq")]
    assert nodes == ["rabbitmq", "rabbitmq-2", "rabbitmq-3"]
    conf = CLUSTER_CONF.read_text()
    for name in nodes:
        assert f"= rabbit@{name}\n" in conf, f"{name} is not in the classic_config peer list"
        mounts = _cluster_services()[name]["volumes"]
        targets = {mount.split(":")[1] for mount in mounts}
        assert "/etc/rabbitmq/conf.d/30-zandd-cluster.conf" in targets, name
        assert "/etc/rabbitmq/advanced.config" in targets, name
        assert "${RABBITMQ_COOKIE" in json.dumps(_cluster_services()[name].get("environment", {}))
    assert re.search(r"^cluster_partition_handling = autoheal$", conf, re.MULTILINE)
    assert "{net_ticktime, 10}" in ADVANCED_CONFIG.read_text()


def test_every_cluster_client_names_all_three_brokers_as_the_same_user() -> None:
    for name, service in _cluster_services().items():
        url_text = service.get("environment", {}).get("ZANDD_AMQP_URL")
        if url_text is None:
            continue
        single = URL(_services()[name]["environment"]["ZANDD_AMQP_URL"])
        authority = url_text.partition("://")[2].partition("/")[0]
        userinfo, _, hosts = authority.rpartition("@")
        assert userinfo == f"{single.user}:{single.password}", name
        assert hosts.split(",") == ["rabbitmq:5672", "rabbitmq-2:5672", "rabbitmq-3:5672"], name
        assert url_text.endswith(single.path), name


def test_the_cluster_vault_is_a_replica_set_initiated_once() -> None:
    services = _cluster_services()
    for name in ("keygen", "keygen-standby", "signer"):
        vault = services[name]["environment"]["ZANDD_VAULT_URL"]
        assert vault.startswith("mongodb://mongo:27017,mongo-2:27017,mongo-3:27017/"), name
        assert "replicaSet=rs0" in vault, name
    members = [name for name in services if re.fullmatch(r"mongo(-\d)?", name)]
    assert members == ["mongo", "mongo-2", "mongo-3"]
    init = " ".join(services["mongo-init"]["entrypoint"])
    for member in members:
        assert f'host: "{member}:27017"' in init
    assert "try { rs.status() }" in init, "initiating must be a no-op on a running set"
