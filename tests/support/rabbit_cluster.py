"""Private RabbitMQ nodes for tests: one node, or a cluster, on free local ports.

The machine's default node (``rabbit@localhost``, port 5672) is never touched: every node
started here has its own name, ports, data and log directories, config file and plugins file,
and a ``HOME`` holding a copy of the default node's Erlang cookie (so ``rabbitmqctl -n`` can
reach it). Nodes are started with ``setsid`` and stopped by their process group, so a test
can kill one (``kill``), hang it (``pause``: SIGSTOP, ``resume``: SIGCONT) or stop it cleanly.

A cluster is made the documented way (``stop_app``; ``join_cluster`` the first node;
``start_app``). ``net_ticktime`` is set low (10 s by default) so that the other nodes notice a
hung node within ~7.5-12.5 s and the queue leaders redeliver what its channels held unacked;
with the Erlang default (60 s) a consumer on a hung node strands its prefetched requests for
a minute. ``cluster_partition_handling`` is ``autoheal``, as in
``ops/rabbitmq/cluster/cluster.conf`` (why: there): a node hung past the tick time is
restarted by the cluster and rejoins by itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from tests.support.net import free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
COOKIE = Path("/var/lib/rabbitmq/.erlang.cookie")
_START_TIMEOUT_S = 90
#: RabbitMQ's default user's well-known password (private test nodes only).
GUEST_PASSWORD = "guest"


def available() -> str | None:
    """None when private nodes can be started here, else why not (a skip reason)."""
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        return "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
    if not COOKIE.exists():
        return f"no Erlang cookie at {COOKIE} (is the rabbitmq-server package installed?)"
    return None


@dataclass
class Node:
    """One private RabbitMQ node: its name, AMQP port and directory."""

    name: str
    port: int
    dist_port: int
    root: Path
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False

    def url(self, vhost: str = "/", *, user: str = "guest", password: str = GUEST_PASSWORD) -> str:
        """An AMQP URL of this node alone (``vhost`` as given, quoted)."""
        path = "" if vhost == "/" else quote(vhost, safe="")
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/{path}"

    @property
    def env(self) -> dict[str, str]:
        """The environment every command about this node runs with."""
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.root / "home"),
            "LANG": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.root / "pid"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def ctl(self, *args: str, timeout_s: float = 120) -> str:
        """``rabbitmqctl -n <this node> args``: its output; raises if it fails."""
        return self._tool("rabbitmqctl", *args, timeout_s=timeout_s)

    def queues_tool(self, *args: str, timeout_s: float = 120) -> str:
        """``rabbitmq-queues -n <this node> args``."""
        return self._tool("rabbitmq-queues", *args, timeout_s=timeout_s)

    def _tool(self, tool: str, *args: str, timeout_s: float) -> str:
        result = subprocess.run(
            [str(RABBITMQ_BIN / tool), "-q", "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} on {self.name} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result.stdout

    def start(self) -> None:
        """Start the node (in its own session) and wait until it serves AMQP."""
        log = (self.root / "server.out").open("ab")
        self.process = subprocess.Popen(
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.root,
        )
        log.close()
        self.paused = False
        self.wait_started()

    def wait_started(self) -> None:
        """Wait until the node's app runs (a booting node, or one just ``start_app``-ed)."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start: {self.tail()}")
            try:
                self.ctl("await_startup", "--timeout", "10", timeout_s=30)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start: {self.tail()}") from None
                time.sleep(0.5)

    def tail(self, lines: int = 20) -> str:
        """The end of the node's console output (for failure messages)."""
        out = self.root / "server.out"
        text = out.read_text(errors="replace") if out.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """Crash the node: SIGKILL its whole process group (the Erlang VM, epmd stays)."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)
        self.paused = False

    def pause(self) -> None:
        """Hang the node (SIGSTOP): its sockets stay open, nothing answers."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """Undo ``pause``."""
        self._signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """Stop the node cleanly (``rabbitmqctl stop``), or kill it if that fails."""
        if self.process is None or self.process.poll() is not None:
            return
        if self.paused:
            self.resume()
        try:
            self.ctl("stop", timeout_s=60)
            self.process.wait(timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            self.kill()

    def _signal(self, signum: signal.Signals) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)


@dataclass
class Cluster:
    """Private RabbitMQ nodes clustered together (or one alone)."""

    nodes: list[Node]
    root: Path
    _keep: bool = field(default=False, repr=False)

    def url(self, vhost: str = "/", *, user: str = "guest", password: str = GUEST_PASSWORD) -> str:
        """One AMQP URL naming every node: ``amqp://u:p@h1:p1,h2:p2,h3:p3/vhost``."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        path = "" if vhost == "/" else quote(vhost, safe="")
        return f"amqp://{user}:{password}@{hosts}/{path}"

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl`` on the first node that is running, not paused and answers (a node
        the cluster is restarting after a partition refuses most commands for a while)."""
        failure: RuntimeError | None = None
        for node in self.running():
            try:
                return node.ctl(*args)
            except RuntimeError as exc:
                failure = exc
        raise failure or RuntimeError("no node of the cluster is running")

    def running(self) -> list[Node]:
        """The nodes whose process runs and is not paused."""
        return [
            node
            for node in self.nodes
            if node.process is not None and node.process.poll() is None and not node.paused
        ]

    def node_named(self, name: str) -> Node:
        """The node called ``name`` (e.g. a queue's leader as the broker names it)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def leader_of(self, queue: str, vhost: str = "/") -> Node:
        """The node that leads quorum queue ``queue`` now."""
        rows = self.ctl("list_queues", "-p", vhost, "name", "leader", "--no-table-headers")
        for line in rows.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == queue:
                return self.node_named(parts[1])
        raise KeyError(f"queue {queue} not found in vhost {vhost}")

    def add_vhost(self, vhost: str, *, user: str = "guest") -> str:
        """Create ``vhost`` with full rights for ``user``; its multi-host URL."""
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        return self.url(vhost, user=user)

    def stop(self) -> None:
        """Stop every node and remove their directories."""
        for node in reversed(self.nodes):
            node.stop()
        if not self._keep:
            shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(
    size: int = 3,
    *,
    root: Path,
    plugins: Sequence[str] = ("rabbitmq_consistent_hash_exchange",),
    net_ticktime: int = 10,
    config: Iterable[str] = (),
) -> Cluster:
    """Start ``size`` private nodes under ``root`` and cluster them; the first is the seed.

    ``config`` lines are appended to every node's ``rabbitmq.conf`` (``max_message_size =
    65536``, ``vm_memory_high_watermark.relative = 0.4``...).
    """
    reason = available()
    if reason is not None:
        raise RuntimeError(reason)
    tag = uuid.uuid4().hex[:6]
    nodes: list[Node] = []
    cluster = Cluster(nodes, root)
    try:
        for index in range(1, size + 1):
            node = _prepare(root, f"zt{tag}r{index}@localhost", plugins, net_ticktime, config)
            nodes.append(node)
            node.start()
        seed = nodes[0]
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", seed.name)
            node.ctl("start_app")
            node.wait_started()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _prepare(
    root: Path, name: str, plugins: Sequence[str], net_ticktime: int, config: Iterable[str]
) -> Node:
    directory = root / name.partition("@")[0]
    (directory / "home").mkdir(parents=True)
    cookie = directory / "home" / ".erlang.cookie"
    shutil.copyfile(COOKIE, cookie)
    cookie.chmod(0o400)
    node = Node(name=name, port=free_port(), dist_port=free_port(), root=directory)
    lines = [
        f"listeners.tcp.default = 127.0.0.1:{node.port}",
        "loopback_users = none",
        "cluster_partition_handling = autoheal",
        "log.console = false",
        "log.file.level = info",
        *config,
    ]
    (directory / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
    (directory / "advanced.config").write_text(
        f"[{{kernel, [{{net_ticktime, {net_ticktime}}}]}}].\n"
    )
    (directory / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
    (directory / "rabbitmq-env.conf").write_text("")
    return node
