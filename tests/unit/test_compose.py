"""compose/: valid for Docker Compose, and in step with the CLI, the settings and the broker users."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
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
    result = _compose_config(COMPOSE, env=MONGO_PASSWORDS)
    assert result.returncode == 0, result.stderr


#: The MongoDB passwords compose requires (no default): any value makes the files render.
MONGO_PASSWORDS = {"MONGO_ROOT_PASSWORD": "root-test", "MONGO_VAULT_PASSWORD": "vault-test"}


def _compose_config(*files: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker-compose") is None:
        pytest.skip(
            "docker-compose is not installed (ops/lib.sh installs it: apt-get install docker-compose)"
        )
    with tempfile.NamedTemporaryFile(suffix=".env") as empty:
        return subprocess.run(
            [
                "docker-compose",
                # Not compose/.env: a developer's passwords there must not make these pass.
                *("--env-file", empty.name),
                *(arg for path in files for arg in ("-f", str(path))),
                *("config", "-q"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
        )


@pytest.mark.parametrize("missing", sorted(MONGO_PASSWORDS))
def test_compose_refuses_to_run_without_each_mongodb_password(missing: str) -> None:
    env = {name: value for name, value in MONGO_PASSWORDS.items() if name != missing}
    for files in ((COMPOSE,), (COMPOSE, CLUSTER)):
        result = _compose_config(*files, env={**env, "RABBITMQ_COOKIE": "test-cookie"})
        assert result.returncode != 0, files
        assert f"set {missing} (compose/.env)" in result.stderr, files


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
    result = _compose_config(
        COMPOSE, CLUSTER, env={**MONGO_PASSWORDS, "RABBITMQ_COOKIE": "test-cookie"}
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
        hosts = vault.partition("@")[2]
        assert hosts.startswith("mongo:27017,mongo-2:27017,mongo-3:27017/"), name
        assert "replicaSet=rs0" in vault, name
    members = [name for name in services if re.fullmatch(r"mongo(-\d)?", name)]
    assert members == ["mongo", "mongo-2", "mongo-3"]
    init = " ".join(services["mongo-init"]["entrypoint"])
    for member in members:
        assert f'host: "{member}:27017"' in init
    assert "try { rs.status() }" in init, "initiating must be a no-op on a running set"


# -- issue 17: networks, MongoDB authentication, a real TPM ----------------------------------

MONGO_INIT = ROOT / "compose" / "mongo-init" / "10-zandd-vault-user.js"
WORKERS = {"keygen", "keygen-standby", "signer"}


def _stack(cluster: bool) -> dict[str, dict[str, Any]]:
    """The services as compose merges them (an override's networks replace the base's)."""
    services = {name: dict(service) for name, service in _services().items()}
    if cluster:
        for name, override in _cluster_services().items():
            services[name] = {**services.get(name, {}), **override}
    return services


def _networks_of(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks")
    assert networks, "a service without networks joins `default`, which every such service shares"
    return set(networks)


def _members(services: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    members: dict[str, set[str]] = {}
    for name, service in services.items():
        for network in _networks_of(service):
            members.setdefault(network, set()).add(name)
    return members


@pytest.mark.parametrize("cluster", [False, True], ids=["single", "cluster"])
def test_producers_reach_only_the_broker(cluster: bool) -> None:
    services = _stack(cluster)
    members = _members(services)
    producer_networks = _networks_of(services["producer"])
    assert producer_networks == {"producers"}
    brokers = {name for name in services if name.startswith("rabbitmq")}
    assert members["producers"] == brokers | {"producer"}
    for name in services:
        if name.startswith("mongo") or name == "swtpm" or name in WORKERS:
            assert not _networks_of(services[name]) & producer_networks, name


@pytest.mark.parametrize("cluster", [False, True], ids=["single", "cluster"])
def test_the_vault_and_the_tpm_are_on_internal_networks_of_their_own(cluster: bool) -> None:
    services = _stack(cluster)
    members = _members(services)
    mongos = {name for name in services if name.startswith("mongo")}
    assert {"mongo"} <= mongos
    for name in mongos:
        assert _networks_of(services[name]) == {"vault"}, name
    assert members["vault"] == mongos | WORKERS
    assert _networks_of(services["swtpm"]) == {"tpm"}
    assert members["tpm"] == {"swtpm", "keygen", "keygen-standby"}
    declared = yaml.safe_load(COMPOSE.read_text())["networks"]
    for network in ("workers", "vault", "tpm"):
        assert declared[network].get("internal") is True, network
    assert "internal" not in (declared["producers"] or {})  # its published port must work


def test_mongodb_requires_authentication_with_no_default_password() -> None:
    services = _stack(cluster=True)
    mongo = _services()["mongo"]["environment"]
    assert mongo["MONGO_INITDB_ROOT_USERNAME"] == "root"
    assert mongo["MONGO_INITDB_ROOT_PASSWORD"].startswith("${MONGO_ROOT_PASSWORD:?")
    assert mongo["MONGO_VAULT_PASSWORD"].startswith("${MONGO_VAULT_PASSWORD:?")
    for stack in (_services(), services):
        for name in WORKERS:
            url = stack[name]["environment"]["ZANDD_VAULT_URL"]
            userinfo = url.removeprefix("mongodb://").partition("@")[0]
            assert (
                userinfo
                == "zandd-vault:${MONGO_VAULT_PASSWORD:?set MONGO_VAULT_PASSWORD (compose/.env)}"
            )
            assert "authSource=zandd" in url, name
    init = _services()["mongo"]["volumes"]
    assert "./mongo-init:/docker-entrypoint-initdb.d:ro" in init
    script = MONGO_INIT.read_text()
    assert "process.env.MONGO_VAULT_PASSWORD" in script
    # Least privilege: readWrite on the vault's database, no other role, no other database.
    assert re.findall(r"role: \"(\w+)\", db: \"(\w+)\"", script) == [("readWrite", "zandd")]
    # The replica set's members authenticate each other; the init job logs in without argv.
    for name in ("mongo", "mongo-2", "mongo-3"):
        assert "--keyFile" in services[name]["command"], name
    assert "process.env.MONGO_ROOT_PASSWORD" in " ".join(services["mongo-init"]["entrypoint"])
    assert "MONGO_ROOT_PASSWORD" not in " ".join(services["mongo-init"]["entrypoint"][:-1])
    ignored = (COMPOSE.parent / ".gitignore").read_text().splitlines()
    assert ".env" in ignored


def test_a_real_tpm_variant_is_documented_beside_the_keygen() -> None:
    text = COMPOSE.read_text()
    assert re.search(r"^\s+#\s+devices:\n\s+#\s+- /dev/tpmrm0:/dev/tpmrm0$", text, re.MULTILINE)
    assert re.search(r"^\s+#\s+ZANDD_TPM_TCTI: device:/dev/tpmrm0$", text, re.MULTILINE)
