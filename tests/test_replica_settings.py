"""The replica settings are checked at start-up: `--stream-replicas` within what JetStream
allows and only with a NATS of our choosing, `--nats-url` as one URL or a list."""

from __future__ import annotations

import pytest

from indexer.app import IndexerService
from indexer.config import ServiceConfig, parse_service_config, redis_read_urls
from indexer.errors import ConfigError
from kvcore.connect import nats_servers
from publisher.cli import parse_bridge_args

BRIDGE = ["--zmq-endpoint", "tcp://127.0.0.1:5557", "--model", "m", "--worker-id", "w"]
CLUSTER = "nats://10.0.0.1:4222, nats://10.0.0.2:4222,nats://10.0.0.3:4222"


class TestStreamReplicas:
    """--stream-replicas: 1 to 5, above 1 only against a given NATS."""

    def test_cluster_settings_accepted(self) -> None:
        """Three replicas on a three-URL cluster."""
        config = parse_service_config(["--nats-url", CLUSTER, "--stream-replicas", "3"], {})
        assert config.stream_replicas == 3
        assert config.nats_url == CLUSTER

    def test_from_the_environment(self) -> None:
        """KV_INDEXER_STREAM_REPLICAS sets it like every other flag."""
        config = parse_service_config([], {"KV_INDEXER_NATS_URL": CLUSTER,
                                           "KV_INDEXER_STREAM_REPLICAS": "3"})
        assert config.stream_replicas == 3

    @pytest.mark.parametrize("value", ["0", "6", "-1"])
    def test_out_of_range_refused(self, value: str) -> None:
        """JetStream keeps 1 to 5 copies."""
        with pytest.raises(ConfigError, match="--stream-replicas must be 1 to 5"):
            parse_service_config(["--nats-url", CLUSTER, "--stream-replicas", value], {})

    def test_embedded_server_refuses_more_than_one(self) -> None:
        """The embedded nats-server is one node: 3 copies cannot be placed."""
        with pytest.raises(ConfigError, match="needs --nats-url"):
            parse_service_config(["--stream-replicas", "3"], {})

    def test_bridge_flag(self) -> None:
        """The bridge takes it for the registry bucket it may create."""
        assert parse_bridge_args([*BRIDGE, "--stream-replicas", "3"]).stream_replicas == "3"
        with pytest.raises(SystemExit):
            parse_bridge_args([*BRIDGE, "--stream-replicas", "7"])


class TestRedisReadUrl:
    """--redis-read-url: replicas of a --redis-url, spoken to as the primary is."""

    def test_list_accepted(self) -> None:
        """Two replicas, comma-separated, with a staleness bound."""
        config = parse_service_config([
            "--redis-url", "redis://primary:6379/0",
            "--redis-read-url", "redis://r1:6379/0, redis://r2:6379/0",
            "--redis-read-max-staleness", "0.25"], {})
        assert redis_read_urls(config) == ["redis://r1:6379/0", "redis://r2:6379/0"]
        assert config.redis_read_max_staleness_s == 0.25

    @pytest.mark.parametrize("url", ["redis://p:6379/0", "redis+cluster://p:7000/0"])
    def test_with_subslots_accepted(self, url: str) -> None:
        """Sub-slots read from replicas, on one node or a cluster's replica nodes."""
        config = parse_service_config([
            "--redis-url", url, "--redis-subslots", "4",
            "--redis-read-url", "redis://r1:6379/0,redis://r2:6379/0"], {})
        assert config.redis_subslots == 4 and len(redis_read_urls(config)) == 2

    @pytest.mark.parametrize(("argv", "message"), [
        (["--redis-read-url", "redis://r1:6379/0"], "needs --redis-url"),
        (["--redis-url", "redis://p:6379/0", "--redis-read-url", "http://r1"],
         "must be redis://"),
        (["--redis-url", "redis://p:6379/0", "--redis-read-url", "redis://r1:6379/0",
          "--redis-read-max-staleness", "0"], "must be a number of seconds > 0"),
        (["--redis-url", "redis+cluster://p:7000/0", "--redis-read-url", "redis://r1:7001/0"],
         "on a Redis Cluster needs --redis-subslots >= 2"),
    ])
    def test_refused(self, argv: list[str], message: str) -> None:
        """No primary, not a Redis URL, a bound of 0: each named."""
        with pytest.raises(ConfigError, match=message):
            parse_service_config(argv, {})


class TestRefusedByNats:
    """A replica count the server cannot place stops start-up with a message."""

    @pytest.mark.integration
    async def test_one_server_refuses_three(self, nats_url: str) -> None:
        """A lone nats-server (no cluster) cannot keep 3 copies: ConfigError, which
        `kv-indexer serve` prints and exits with 2."""
        service = IndexerService(ServiceConfig(nats_url=nats_url, grpc_listen="",
                                               metrics_listen="", stream_replicas=3))
        try:
            with pytest.raises(ConfigError, match="--stream-replicas 3: NATS refused it"):
                await service.start()
        finally:
            await service.close()


class TestNatsUrlList:
    """A cluster is given as its nodes' URLs separated by commas."""

    def test_split(self) -> None:
        """Spaces and empty entries are dropped, order kept."""
        assert nats_servers(CLUSTER + ",") == [
            "nats://10.0.0.1:4222", "nats://10.0.0.2:4222", "nats://10.0.0.3:4222"]

    def test_an_entry_without_scheme_refused(self) -> None:
        """Every entry must be a URL."""
        with pytest.raises(ConfigError, match="--nats-url must be a URL"):
            parse_service_config(["--nats-url", "nats://a:4222,b:4222"], {})
