"""A real 3-node nats-server cluster on local ports for tests: routes between the nodes,
JetStream on each (its own server name and store dir), any node SIGKILLable and
restartable. `url` lists every node, comma-separated, as `--nats-url` takes it."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import nats
from nats.errors import Error as NatsError

from tests.support.servers import ConfiguredNats, free_port

__all__ = ["NatsCluster"]

CLUSTER_NAME = "kvtest"


class NatsCluster:
    """`size` nats-servers routed into one JetStream cluster."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        client_ports = [free_port() for _ in range(size)]
        route_ports = [free_port() for _ in range(size)]
        routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in route_ports)
        self.nodes = [
            ConfiguredNats(workdir / f"n{i}", _node_config(i, route_ports[i], routes),
                           port=client_ports[i])
            for i in range(size)]

    @property
    def url(self) -> str:
        return ",".join(self.servers)

    @property
    def servers(self) -> list[str]:
        return [node.url() for node in self.nodes]

    def name(self, node: int) -> str:
        return f"n{node}"

    def start(self) -> NatsCluster:
        for node in self.nodes:
            node.start()
        return self

    def kill(self, node: int) -> None:
        """SIGKILL one node: no goodbye to its peers or clients."""
        proc = self.nodes[node].proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.nodes[node].proc = None

    def restart(self, node: int) -> None:
        self.nodes[node].start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    async def wait_ready(self, replicas: int, timeout: float = 30.0) -> None:
        """Until a JetStream meta leader is elected and an R`replicas` stream can be made
        (every peer known), probed with a throwaway stream."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            nc = await nats.connect(self.servers, max_reconnect_attempts=2)
            try:
                js = nc.jetstream()
                await js.add_stream(name="READY_PROBE", subjects=["ready.probe"],
                                    num_replicas=replicas)
                await js.delete_stream("READY_PROBE")
                return
            except (NatsError, TimeoutError) as exc:
                last = exc
            finally:
                await nc.close()
            await asyncio.sleep(0.25)
        raise RuntimeError(f"the NATS cluster was not ready within {timeout}s: {last!r}")


def _node_config(index: int, route_port: int, routes: str) -> str:
    """What ConfiguredNats adds after its listen address and JetStream store dir."""
    return (f'server_name: "n{index}"\n'
            f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: \"127.0.0.1:{route_port}\"\n"
            f"  routes: [{routes}]\n}}\n")
