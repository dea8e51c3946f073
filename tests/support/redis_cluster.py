"""A real Redis Cluster for tests: 3 masters with one replica each, private processes on
free local ports (each port's cluster-bus port, +10000, free too), private temp dirs,
created with `redis-cli --cluster create`. The test that owns it may SIGKILL a master,
SIGSTOP a replica (so it misses writes), promote a replica, or move a hash slot."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from indexer.errors import BackendError
from tests.support.polling import eventually
from tests.support.servers import RedisServer

CLUSTER_NODE_TIMEOUT_MS = 1500


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """`count` free ports below 55535 whose +10000 (the cluster bus) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port < 55535 and port not in ports and _port_free(port + 10000):
            ports.append(port)
    return ports


class ClusterNode(RedisServer):
    """One cluster-enabled redis-server (its nodes.conf in its own dir)."""

    def argv(self) -> list[str]:
        return [*super().argv(), "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.workdir / "nodes.conf"),
                "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
                "--cluster-require-full-coverage", "no",
                # A replica's first sync at once (the default waits 5 s for others).
                "--repl-diskless-sync-delay", "0"]

    def cli(self, *args: str, timeout: float = 30) -> str:
        """`redis-cli -p PORT args...`, its output (raises on a failed run)."""
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                             text=True, timeout=timeout, check=True)
        return out.stdout

    def stop_signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)


class RedisCluster:
    """Masters `nodes[0:3]`, their replicas `nodes[3:6]` as `--cluster create` paired them
    (read back from CLUSTER NODES, which is the truth); `modules` loaded by every node."""

    def __init__(self, workdir: Path, masters: int = 3, *,
                 modules: tuple[Path, ...] = ()) -> None:
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli not found: run `make setup` (installs redis-server)")
        ports = cluster_ports(masters * 2)
        self.nodes = [ClusterNode(workdir / f"node-{port}", port, modules=modules)
                      for port in ports]
        self.masters = masters

    @property
    def url(self) -> str:
        """One node's URL: the index finds the others."""
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addresses,
                        "--cluster-replicas", "1", "--cluster-yes"],
                       capture_output=True, text=True, timeout=60, check=True)
        self.wait_ok()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is not None:
                node.proc = None  # SIGKILLed by the test
            elif node.proc is not None:
                os.kill(node.proc.pid, signal.SIGCONT)  # a replica left stopped
            node.stop()

    def live_nodes(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def topology(self) -> dict[int, dict[str, object]]:
        """port -> {"id", "master" (bool), "master_id", "slots": [(lo, hi)], "fail"} as one
        live node sees it."""
        text = self.live_nodes()[0].cli("CLUSTER", "NODES")
        out: dict[int, dict[str, object]] = {}
        for line in text.splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            slots = []
            for part in fields[8:]:
                if part.startswith("["):
                    continue  # a migrating/importing note
                lo, _, hi = part.partition("-")
                slots.append((int(lo), int(hi or lo)))
            out[port] = {"id": fields[0], "master": "master" in fields[2].split(","),
                         "master_id": fields[3], "slots": slots, "fail": "fail" in fields[2]}
        return out

    def node_of_slot(self, slot: int) -> ClusterNode:
        for port, info in self.topology().items():
            if info["master"] and not info["fail"] and any(
                    lo <= slot <= hi for lo, hi in info["slots"]):  # type: ignore[attr-defined]
                return self.by_port(port)
        raise LookupError(f"no master serves slot {slot}")

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        topology = self.topology()
        master_id = topology[master.port]["id"]
        for port, info in topology.items():
            if info["master_id"] == master_id and not info["fail"]:
                return self.by_port(port)
        raise LookupError(f"{master.port} has no live replica")

    def wait_replica_synced(self, master: ClusterNode, timeout: float = 30) -> ClusterNode:
        """Until `master`'s replica has processed every write `master` had when called
        (replication offsets); the replica."""
        replica = self.replica_of(master)
        target = _repl_offset(master.cli("INFO", "replication"), "master_repl_offset")
        deadline = time.monotonic() + timeout
        while _repl_offset(replica.cli("INFO", "replication"), "slave_repl_offset") < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {replica.port} behind offset {target}")
            time.sleep(0.02)
        return replica

    def cut_off_replica(self, master: ClusterNode) -> ClusterNode:
        """`master`'s replica, synced, then stopped and its link cut while it cannot read
        it: what `master` acknowledges from now on never reaches it. The replica."""
        replica = self.wait_replica_synced(master)
        replica.stop_signal(signal.SIGSTOP)
        master.cli("CLIENT", "KILL", "TYPE", "replica")
        return replica

    def promote_cut_off(self, master: ClusterNode, replica: ClusterNode) -> None:
        """Kill `master` and promote its cut-off replica (`cut_off_replica`), without
        what the master acknowledged since: a failover that loses writes."""
        master.kill()
        replica.stop_signal(signal.SIGCONT)
        replica.cli("CLUSTER", "FAILOVER", "TAKEOVER")
        self.wait_ok(replicated=False)

    def by_port(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def wait_ok(self, timeout: float = 30, *, replicated: bool = True) -> None:
        """Until every live node says cluster_state:ok, all 16384 slots are served and
        (if `replicated`) each master with slots has a live, synced replica."""
        deadline = time.monotonic() + timeout
        while True:
            states = [n.cli("CLUSTER", "INFO") for n in self.live_nodes()]
            if all("cluster_state:ok" in s and "cluster_slots_ok:16384" in s
                   for s in states) and (not replicated or self._replicated()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ok: {states[0]}")
            time.sleep(0.1)

    def _replicated(self) -> bool:
        topology = self.topology()
        masters = [i["id"] for i in topology.values() if i["master"] and i["slots"]]
        replicated = {i["master_id"] for port, i in topology.items()
                      if not i["master"] and not i["fail"]
                      and "master_link_status:up" in self.by_port(port).cli("INFO", "replication")}
        return len(masters) == self.masters and set(masters) <= replicated

    def move_slot(self, slot: int, target: ClusterNode, *, pipeline: int = 10,
                  pause_s: float = 0.0) -> None:
        """Migrate hash slot `slot`'s keys to `target` and assign it there, as
        `redis-cli --cluster reshard` does (SETSLOT IMPORTING/MIGRATING, MIGRATE, NODE),
        `pipeline` keys per MIGRATE, `pause_s` between them (a slow migration)."""
        source = self.node_of_slot(slot)
        if source is target:
            return
        topology = self.topology()
        source_id, target_id = topology[source.port]["id"], topology[target.port]["id"]
        target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", str(source_id))
        source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", str(target_id))
        while True:
            keys = source.cli("CLUSTER", "GETKEYSINSLOT", str(slot), str(pipeline)).split()
            if not keys:
                break
            source.cli("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *keys)
            time.sleep(pause_s)
        for node in (target, source):
            node.cli("CLUSTER", "SETSLOT", str(slot), "NODE", str(target_id))
        for node in self.live_nodes():
            if node.port not in (source.port, target.port) and topology[node.port]["master"]:
                node.cli("CLUSTER", "SETSLOT", str(slot), "NODE", str(target_id))


def _repl_offset(info: str, field: str) -> int:
    """A replication offset from `INFO replication` output (-1 if absent)."""
    for line in info.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value)
    return -1


async def pinged_after_failover(index: Any, timeout: float = 10.0) -> None:
    """Until `index.ping()` succeeds: its client learns a new master at its next error."""

    async def pinged() -> bool:
        try:
            await index.ping()
        except BackendError:
            return False
        return True

    await eventually(pinged, timeout)
