"""Service settings: flags, environment variables, validation, and the README table."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from indexer.config import SETTINGS, env_name, parse_service_config
from indexer.errors import ConfigError
from kvcore.runtime import run_event_loop

README = Path(__file__).resolve().parent.parent / "README.md"


class TestParsing:
    """Flags win over environment variables, which win over defaults."""

    def test_defaults(self) -> None:
        """No flag and no environment: embedded NATS, in-memory index, gRPC on 50051."""
        config = parse_service_config([], environ={})
        assert (config.nats_url, config.redis_url, config.grpc_listen) == (
            None, None, "127.0.0.1:50051")

    def test_environment_and_flags(self) -> None:
        """KV_INDEXER_* variables are read; a flag overrides its variable."""
        env = {"KV_INDEXER_REDIS_URL": "redis://r:6379/0", "KV_INDEXER_PARTITIONS": "4"}
        config = parse_service_config(["--partitions", "16"], environ=env)
        assert (config.redis_url, config.partitions) == ("redis://r:6379/0", 16)


class TestServerLimits:
    """The gRPC limits of `kv-indexer serve` reach the server's settings."""

    def test_defaults_are_the_servers(self) -> None:
        from indexer.serve.service import ServiceSettings, service_settings

        settings = service_settings(parse_service_config([], environ={}))
        assert settings == ServiceSettings()

    def test_flags_and_environment(self) -> None:
        from indexer.serve.service import service_settings

        env = {"KV_INDEXER_MAX_REQUEST_LOADS": "7", "KV_INDEXER_GRPC_IDLE_TIMEOUT_S": "2.5",
               "KV_INDEXER_GRPC_STREAM_WINDOW": "5"}
        config = parse_service_config(
            ["--max-request-workers", "9", "--max-batch-requests", "3",
             "--grpc-max-connections", "0"], environ=env)
        settings = service_settings(config, share_port=True)
        assert (settings.max_request_workers, settings.max_request_loads,
                settings.max_batch_requests, settings.connection_idle_s,
                settings.max_connections, settings.share_port,
                settings.stream_window) == (9, 7, 3, 2.5, None, True, 5)


class TestValidation:
    """A bad setting fails at start-up with a message naming it."""

    @pytest.mark.parametrize(
        ("argv", "env", "message"),
        [
            (["--partitions", "0"], {}, "--partitions"),
            (["--partitions", "many"], {}, "--partitions"),
            ([], {"KV_INDEXER_PARTITIONS": "x"}, "KV_INDEXER_PARTITIONS"),
            (["--grpc-listen", "nowhere"], {}, "--grpc-listen"),
            (["--redis-url", "localhost:6379"], {}, "--redis-url"),
            (["--nats-url", "localhost"], {}, "--nats-url"),
            (["--log-format", "xml"], {}, "--log-format"),
            (["--liveness-ttl", "-1"], {}, "--liveness-ttl"),
            (["--event-loop", "trio"], {}, "--event-loop"),
            (["--max-request-workers", "0"], {}, "--max-request-workers"),
            ([], {"KV_INDEXER_MAX_REQUEST_LOADS": "0"}, "--max-request-loads"),
            (["--max-batch-requests", "0"], {}, "--max-batch-requests"),
            (["--grpc-stream-window", "0"], {}, "--grpc-stream-window"),
            (["--grpc-idle-timeout", "-1"], {}, "--grpc-idle-timeout"),
            (["--grpc-idle-timeout", "nan"], {}, "--grpc-idle-timeout"),
            (["--grpc-max-connections", "-1"], {}, "--grpc-max-connections"),
        ],
    )
    def test_rejected(self, argv: list[str], env: dict[str, str], message: str) -> None:
        """Each invalid value raises ConfigError naming the flag or variable."""
        with pytest.raises(ConfigError, match=message):
            parse_service_config(argv, environ=env)


class TestDocumented:
    """The README's configuration table lists every flag and variable there is."""

    def test_readme_lists_every_setting(self) -> None:
        """Each flag and its KV_INDEXER_* variable appear in README.md."""
        text = README.read_text()
        for flag, field, _kind, _help in SETTINGS:
            assert f"`{flag}`" in text, flag
            assert f"`{env_name(field)}`" in text, env_name(field)

    def test_readme_lists_every_bridge_setting(self) -> None:
        """Each kv-publisher bridge flag and its KV_PUBLISHER_* variable appear in README.md."""
        from publisher.cli import BRIDGE_SETTINGS

        text = README.read_text()
        for flag, env, _default, _help in BRIDGE_SETTINGS:
            assert f"`{flag}`" in text, flag
            assert f"`KV_PUBLISHER_{env}`" in text, env


class TestEventLoop:
    """`--event-loop`: uvloop unless asked for asyncio's own loop."""

    @staticmethod
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    def test_auto_runs_uvloop_when_installed(self) -> None:
        pytest.importorskip("uvloop")
        assert parse_service_config([], environ={}).event_loop == "auto"
        assert run_event_loop(self.loop_module(), "auto").startswith("uvloop")

    def test_asyncio_runs_asyncio_s_own_loop(self) -> None:
        config = parse_service_config(["--event-loop", "asyncio"], environ={})
        assert run_event_loop(self.loop_module(), config.event_loop).startswith("asyncio")

    def test_uvloop_asked_for_but_missing_is_a_config_error(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("indexer.config.uvloop_installed", lambda: False)
        with pytest.raises(ConfigError, match="uvloop is not installed"):
            parse_service_config(["--event-loop", "uvloop"], environ={})
