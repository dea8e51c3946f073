"""The deployment files against the code: docker-compose.yml, the Dockerfile, the Kubernetes
manifests and the Grafana dashboard use only flags, environment variables and metrics that
exist, and the pieces that must agree with each other do.

No container runs here (no Docker engine needed): the files are parsed and every
`kv-indexer serve`, `kv-publisher bridge` and `kv-sim engines` command found in them
goes through the real argument parsers.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit

import pytest
from prometheus_client import generate_latest

from indexer.cli import parse_health_args
from indexer.config import SETTINGS, env_name, parse_service_config
from indexer.index.instrumented import InstrumentedIndex
from indexer.index.memory import MemoryIndex
from indexer.ingest.consumer import ConsumerStats
from indexer.metrics import EventPathMetrics, MetricsExporter, register_process_metrics
from indexer.serve.grpc_metrics import GrpcMetrics
from kvcore import __version__
from kvsim import mock_engines as simulate
from publisher.cli import BRIDGE_SETTINGS, parse_bridge_args
from tests.support.exposition import exposed_names
from tests.support.pod_security import pod_spec_of, restricted_violations

try:
    import yaml
except ImportError:  # PyYAML comes with the dev extra
    yaml = None

needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML is not installed")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
KUBERNETES = ROOT / "deploy" / "kubernetes"
DASHBOARD = ROOT / "deploy" / "grafana" / "kv-indexer-dashboard.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"

SERVE, BRIDGE, SIMULATE = "kv-indexer serve", "kv-publisher bridge", "kv-sim engines"
OUR_IMAGE = "kv-indexer:"  # images built from the Dockerfile (compose tag and manifests)


def _simulate_flags() -> set[str]:
    parser = simulate._parser()
    return {option for action in parser._actions for option in action.option_strings}


FLAGS: dict[str, set[str]] = {
    SERVE: {flag for flag, *_ in SETTINGS},
    BRIDGE: {flag for flag, *_ in BRIDGE_SETTINGS},
    SIMULATE: _simulate_flags() - {"-h", "--help"},
}
ENV_VARS: dict[str, set[str]] = {
    SERVE: {env_name(field) for _flag, field, *_ in SETTINGS},
    BRIDGE: {f"KV_PUBLISHER_{suffix}" for _flag, suffix, *_ in BRIDGE_SETTINGS},
    SIMULATE: set(),  # simulate reads no environment variables
}
OUR_ENV = re.compile(r"^KV_(INDEXER|PUBLISHER)_")
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


class Program(NamedTuple):
    """One of our commands found in a deployment file."""

    kind: str  # SERVE, BRIDGE or SIMULATE
    args: list[str]  # what follows the subcommand
    env: dict[str, str | None]  # None: set from a secret or field reference
    where: str  # file and service / container, for messages


# --- reading the files --------------------------------------------------------------------


def image_entrypoint() -> list[str]:
    """The Dockerfile's ENTRYPOINT (exec form)."""
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            value: list[str] = json.loads(line.removeprefix("ENTRYPOINT"))
            return value
    raise AssertionError("the Dockerfile has no ENTRYPOINT")


def _argv(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default}, resolved to the default."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def classify(argv: list[str], env: dict[str, str | None], where: str) -> Program | None:
    """Our program in an argv, or None for anything else (nats, vllm, ...)."""
    if len(argv) < 2:
        return None
    command = f"{Path(argv[0]).name} {argv[1]}"
    if command not in FLAGS:
        return None
    return Program(command, [_interpolate(a) for a in argv[2:]], env, where)


def compose() -> dict[str, Any]:
    assert yaml is not None
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def compose_env(service: Mapping[str, Any]) -> dict[str, str | None]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in raw)
        raw = dict(pairs)
    return {k: None if v is None else _interpolate(str(v)) for k, v in raw.items()}


def compose_argv(service: Mapping[str, Any]) -> list[str]:
    """entrypoint + command as the container runs them."""
    if "entrypoint" in service:
        entrypoint = _argv(service["entrypoint"])
    elif "build" in service or str(service.get("image", "")).startswith(OUR_IMAGE):
        entrypoint = image_entrypoint()
    else:
        entrypoint = []  # an upstream image: its own entrypoint, not ours
    return entrypoint + _argv(service.get("command"))


def compose_programs() -> list[Program]:
    programs = []
    for name, service in compose()["services"].items():
        env = compose_env(service)
        program = classify(compose_argv(service), env, f"docker-compose.yml: {name}")
        if program is not None:
            programs.append(program)
    return programs


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every YAML document under deploy/kubernetes."""
    assert yaml is not None
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def containers(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def container_env(container: Mapping[str, Any]) -> dict[str, str | None]:
    return {e["name"]: (str(e["value"]) if "value" in e else None)
            for e in container.get("env", [])}


def container_argv(container: Mapping[str, Any]) -> list[str]:
    if "command" in container:
        entrypoint = _argv(container["command"])
    elif str(container.get("image", "")).startswith(OUR_IMAGE):
        entrypoint = image_entrypoint()
    else:
        entrypoint = []
    return entrypoint + _argv(container.get("args"))


def manifest_programs() -> list[Program]:
    programs = []
    for file, doc in manifests():
        for container in containers(doc):
            where = f"{file}: {doc['metadata']['name']}/{container['name']}"
            program = classify(container_argv(container), container_env(container), where)
            if program is not None:
                programs.append(program)
    return programs


def flags_of(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("-")]


def option(args: list[str], flag: str) -> str | None:
    """The value of `flag` in an argv (`--flag value` or `--flag=value`)."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def setting(program: Program, flag: str, env_var: str) -> str | None:
    """A bridge or serve setting as the program sees it: the flag, else the variable."""
    value = option(program.args, flag)
    return value if value is not None else program.env.get(env_var)


def check_flags(programs: list[Program]) -> list[str]:
    problems = []
    for program in programs:
        for flag in flags_of(program.args):
            if flag not in FLAGS[program.kind]:
                problems.append(f"{program.where}: `{program.kind}` has no flag {flag}")
    return problems


def check_env(programs: list[Program]) -> list[str]:
    problems = []
    for program in programs:
        for name in program.env:
            if OUR_ENV.match(name) and name not in ENV_VARS[program.kind]:
                problems.append(f"{program.where}: `{program.kind}` reads no variable {name}")
    return problems


def check_parse(programs: list[Program], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run every command line (with its environment) through the real parser."""
    problems = []
    for program in programs:
        env = {k: v for k, v in program.env.items() if v is not None}
        try:
            if program.kind == SERVE:
                parse_service_config(program.args, environ=env)
            elif program.kind == BRIDGE:
                with monkeypatch.context() as m:  # the parser reads os.environ for defaults
                    for name in ENV_VARS[BRIDGE]:
                        m.delenv(name, raising=False)
                    for name, value in env.items():
                        m.setenv(name, value)
                    parse_bridge_args(program.args)
            else:
                simulate._parser().parse_args(program.args)
        except SystemExit as exc:
            problems.append(f"{program.where}: `{program.kind}` exits {exc.code} on its args")
        except Exception as exc:  # noqa: BLE001 - reported, with the file and service
            problems.append(f"{program.where}: `{program.kind}`: {exc}")
    return problems


def kv_events_config(argv: list[str]) -> dict[str, Any]:
    raw = option(argv, "--kv-events-config")
    assert raw is not None, "vLLM runs without --kv-events-config"
    config: dict[str, Any] = json.loads(raw)
    return config


def port(endpoint: str) -> int:
    parsed = urlsplit(endpoint)
    assert parsed.port is not None, endpoint
    return parsed.port


def check_engine_bridge(engine_argv: list[str], bridge: Program, engine_host: str) -> list[str]:
    """vLLM's --kv-events-config, block size and model against its bridge's settings."""
    config = kv_events_config(engine_argv)
    problems = []
    if config.get("enable_kv_cache_events") is not True:
        problems.append("enable_kv_cache_events is not true")
    if config.get("publisher", "zmq") != "zmq":
        problems.append(f"publisher is {config.get('publisher')!r}, not zmq")
    endpoint, replay = config.get("endpoint", ""), config.get("replay_endpoint", "")
    if endpoint != "tcp://*:5557" or replay != "tcp://*:5558":
        problems.append(f"engine endpoints {endpoint!r} / {replay!r}, not tcp://*:5557 / 5558")
    pairs = (("--zmq-endpoint", "KV_PUBLISHER_ZMQ_ENDPOINT", endpoint),
             ("--replay-endpoint", "KV_PUBLISHER_REPLAY_ENDPOINT", replay))
    for flag, env_var, engine_side in pairs:
        value = setting(bridge, flag, env_var) or ""
        if urlsplit(value).hostname != engine_host or port(value) != port(engine_side):
            problems.append(f"bridge {flag} {value!r} does not reach {engine_host}:"
                            f"{port(engine_side)}")
    topic = setting(bridge, "--topic", "KV_PUBLISHER_TOPIC") or ""
    if topic != config.get("topic", ""):
        problems.append(f"bridge topic {topic!r} != engine topic {config.get('topic', '')!r}")
    block_size = setting(bridge, "--block-size", "KV_PUBLISHER_BLOCK_SIZE") or "16"
    if block_size != (option(engine_argv, "--block-size") or "16"):
        problems.append(f"bridge block size {block_size} != vLLM --block-size "
                        f"{option(engine_argv, '--block-size')}")
    model = setting(bridge, "--model", "KV_PUBLISHER_MODEL")
    if model != option(engine_argv, "--model"):
        problems.append(f"bridge model {model!r} != vLLM --model "
                        f"{option(engine_argv, '--model')!r}")
    return problems


def by_kind(programs: list[Program], kind: str) -> list[Program]:
    return [p for p in programs if p.kind == kind]


# --- docker-compose.yml -------------------------------------------------------------------


@needs_yaml
class TestCompose:
    """docker-compose.yml: services, profiles, and every command against the CLI."""

    def test_services_and_profiles(self) -> None:
        """nats (JetStream, volume), redis and the indexer by default; gpu and sim profiles."""
        services = compose()["services"]
        for name in ("nats", "redis", "indexer"):
            assert name in services and not services[name].get("profiles"), name
        nats = services["nats"]
        assert nats["image"].startswith("nats:")
        assert "-js" in _argv(nats.get("command")), "nats runs without JetStream"
        assert any(str(v).endswith(":/data") for v in nats.get("volumes", []))
        assert services["redis"]["image"].startswith("redis:")
        assert services["indexer"].get("build") == "."
        assert services["vllm"]["image"].startswith("vllm/vllm-openai:")
        for name in ("vllm", "vllm-publisher"):
            assert services[name]["profiles"] == ["gpu"], name
        sim = [n for n in services if n.startswith("sim-")]
        assert len(sim) >= 2 and all(services[n]["profiles"] == ["sim"] for n in sim)

    def test_healthchecks_of_our_image(self) -> None:
        """The indexer checks itself with `kv-indexer health` (a command the CLI parses);
        every other container of the image turns off the image's HEALTHCHECK, which asks
        kv-indexer serve's gRPC port it does not have."""
        for name, service in compose()["services"].items():
            if "build" not in service and not str(service.get("image", "")).startswith(
                    OUR_IMAGE):
                continue
            check = service.get("healthcheck", {})
            if compose_argv(service)[:2] == ["kv-indexer", "serve"]:
                test = check["test"]
                assert test[:3] == ["CMD", "kv-indexer", "health"], test
                parse_health_args(test[3:])
            else:
                assert check.get("disable") is True, f"{name} inherits the indexer's check"

    def test_programs_found(self) -> None:
        """Compose runs serve, bridge (gpu and sim) and simulate (the checks below see them)."""
        kinds = [p.kind for p in compose_programs()]
        assert kinds.count(SERVE) == 1
        assert kinds.count(BRIDGE) >= 2
        assert kinds.count(SIMULATE) == 1

    def test_flags_exist(self) -> None:
        """Every flag in a compose command exists in that command's parser."""
        assert check_flags(compose_programs()) == []

    def test_env_vars_exist(self) -> None:
        """Every KV_INDEXER_* / KV_PUBLISHER_* variable set is one the program reads."""
        assert check_env(compose_programs()) == []

    def test_commands_parse(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each command with its environment passes the real parser and its checks."""
        assert check_parse(compose_programs(), monkeypatch) == []

    def test_indexer_settings(self) -> None:
        """The indexer listens on 0.0.0.0, publishes those ports, uses the nats/redis services."""
        services = compose()["services"]
        (program,) = by_kind(compose_programs(), SERVE)
        env = {k: v for k, v in program.env.items() if v is not None}
        config = parse_service_config(program.args, environ=env)
        assert config.grpc_listen.startswith("0.0.0.0:")
        assert config.metrics_listen.startswith("0.0.0.0:")
        published = {str(p).split(":")[-1] for p in services["indexer"].get("ports", [])}
        for listen in (config.grpc_listen, config.metrics_listen):
            assert listen.rpartition(":")[2] in published, listen
        assert urlsplit(config.nats_url or "").hostname == "nats"
        assert urlsplit(config.redis_url or "").hostname == "redis"

    def test_vllm_events_reach_bridge(self) -> None:
        """vLLM's --kv-events-config, model and block size match its publisher sidecar."""
        service = compose()["services"]["vllm"]
        engine_argv = [_interpolate(a) for a in _argv(service["command"])]
        bridges = [p for p in by_kind(compose_programs(), BRIDGE) if "vllm-publisher" in p.where]
        assert len(bridges) == 1
        assert check_engine_bridge(engine_argv, bridges[0], "vllm") == []

    def test_sim_bridges_match_simulator_ports(self) -> None:
        """One bridge per simulated worker, on the ports `simulate` binds, unique worker ids."""
        (sim,) = by_kind(compose_programs(), SIMULATE)
        args = simulate._parser().parse_args(sim.args)
        host = next(name for name, service in compose()["services"].items()
                    if getattr(classify(compose_argv(service), {}, name), "kind", None) == SIMULATE)
        wanted = {(args.base_port + 2 * args.dp_size * w + r,
                   args.base_port + 2 * args.dp_size * w + args.dp_size + r)
                  for w in range(args.workers) for r in range(args.dp_size)}
        bridges = [p for p in by_kind(compose_programs(), BRIDGE) if "sim-" in p.where]
        got = set()
        for bridge in bridges:
            live = setting(bridge, "--zmq-endpoint", "KV_PUBLISHER_ZMQ_ENDPOINT") or ""
            replay = setting(bridge, "--replay-endpoint", "KV_PUBLISHER_REPLAY_ENDPOINT") or ""
            assert urlsplit(live).hostname == urlsplit(replay).hostname == host, bridge.where
            got.add((port(live), port(replay)))
        assert got == wanted
        ids = [setting(b, "--worker-id", "KV_PUBLISHER_WORKER_ID") for b in bridges]
        assert len(set(ids)) == len(ids) == len(wanted)

    def test_mounted_files_exist(self) -> None:
        """Every file compose bind-mounts from the repository exists."""
        for name, service in compose()["services"].items():
            for volume in service.get("volumes", []):
                source = str(volume).split(":", 1)[0]
                if source.startswith("./"):
                    assert (ROOT / source).exists(), f"{name}: {source}"

    def test_prometheus_scrapes_indexer(self) -> None:
        """The monitoring profile's Prometheus scrapes the indexer's metrics port."""
        assert yaml is not None
        config = yaml.safe_load(PROMETHEUS.read_text())
        targets = [t for job in config["scrape_configs"] for sc in job["static_configs"]
                   for t in sc["targets"]]
        (program,) = by_kind(compose_programs(), SERVE)
        listen = setting(program, "--metrics-listen", "KV_INDEXER_METRICS_LISTEN") or ""
        assert f"indexer:{listen.rpartition(':')[2]}" in targets

    def test_prometheus_scrapes_bridges(self) -> None:
        """Every compose bridge serves /metrics, and Prometheus scrapes it (the dashboard's
        bridge and process rows)."""
        assert yaml is not None
        config = yaml.safe_load(PROMETHEUS.read_text())
        targets = [t for job in config["scrape_configs"] for sc in job["static_configs"]
                   for t in sc["targets"]]
        bridges = by_kind(compose_programs(), BRIDGE)
        assert bridges
        for program in bridges:
            listen = setting(program, "--metrics-listen", "KV_PUBLISHER_METRICS_LISTEN")
            assert listen, program.where
            service = program.where.rpartition(": ")[2]
            assert f"{service}:{listen.rpartition(':')[2]}" in targets, program.where


# --- Dockerfile ---------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line.strip("/") for line in lines if line and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") or
               (p.startswith("**/") and fnmatch.fnmatch(Path(path).name, p[3:]))
               for p in patterns)


class TestDockerfile:
    """The image installs the package and runs `kv-indexer serve`."""

    def test_image(self) -> None:
        """python:3.11 slim pinned to a patch release, the server and publisher extras
        installed with a compiler for the C extension (checked in the build), entrypoint
        kv-indexer serve."""
        text = DOCKERFILE.read_text()
        assert re.search(r"^FROM python:3\.11\.\d+-slim-\w+$", text, re.M)
        run = re.search(r"^RUN (.*?[^\\])$", text, re.M | re.S)
        assert run is not None
        steps = run.group(1)
        assert re.search(r"apt-get install [^&]*\bgcc\b", steps)
        install = "pip install '.[server,publisher]'"
        assert steps.index("gcc") < steps.index(install) < steps.index("k.NATIVE")
        assert image_entrypoint() == ["kv-indexer", "serve"]

    def test_labels(self) -> None:
        """OCI labels: title, version (kvcore.__version__), licence (pyproject's), the base
        image as FROM names it."""
        text = DOCKERFILE.read_text()
        labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', text))
        assert labels["org.opencontainers.image.title"] == "kv-indexer"
        assert labels["org.opencontainers.image.version"] == __version__
        assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
        base = re.search(r"^FROM (\S+)$", text, re.M)
        assert base is not None
        assert labels["org.opencontainers.image.base.name"] == f"docker.io/library/{base[1]}"

    def test_healthcheck(self) -> None:
        """HEALTHCHECK runs `kv-indexer health` on the gRPC port the image listens on, with
        arguments the command accepts, and maps every failure to 1 (Docker reserves 2)."""
        text = DOCKERFILE.read_text().replace("\\\n", " ")
        check = re.search(r"^HEALTHCHECK (.*)$", text, re.M)
        assert check is not None
        options, _, command = check[1].partition(" CMD ")
        assert re.search(r"--interval=\d+s", options) and re.search(r"--timeout=\d+s", options)
        argv, _, fallback = command.partition(" || ")
        assert fallback.strip() == "exit 1"
        words = shlex.split(argv)
        assert words[:2] == ["kv-indexer", "health"]
        env = dict(re.findall(r"(KV_INDEXER_\w+)=(\S+)", text))
        listen_port = env["KV_INDEXER_GRPC_LISTEN"].rpartition(":")[2]
        args = [w.replace("${KV_INDEXER_GRPC_LISTEN##*:}", listen_port) for w in words[2:]]
        parsed = parse_health_args(args)
        assert parsed.target == f"127.0.0.1:{listen_port}"
        probe_timeout = float(re.search(r"--timeout=(\d+)s", options)[1])  # type: ignore[index]
        assert parsed.timeout < probe_timeout

    def test_copied_sources_reach_the_build(self) -> None:
        """COPY sources exist, survive .dockerignore, and cover what `pip install .` needs."""
        patterns = dockerignore_patterns()
        copied: set[str] = set()
        for line in DOCKERFILE.read_text().splitlines():
            if line.startswith("COPY"):
                *sources, _dest = line.split()[1:]
                copied.update(s.rstrip("/") for s in sources if not s.startswith("--"))
        for source in copied:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
        # readme = README.md; license-files; native/ holds the extension's sources; every
        # package pyproject lists (kv-sim engines runs from the image too)
        needed = {"pyproject.toml", "README.md", "LICENSE", "NOTICE", "native", "kvcore",
                  "indexer", "publisher", "kvsim"}
        assert needed <= copied, needed - copied

    def test_container_listen_addresses(self) -> None:
        """The image listens on all interfaces with a valid configuration."""
        env = dict(re.findall(r"(KV_INDEXER_\w+)=(\S+)", DOCKERFILE.read_text()))
        assert set(env) <= ENV_VARS[SERVE]
        config = parse_service_config([], environ=env)
        assert config.grpc_listen == "0.0.0.0:50051"
        assert config.metrics_listen == "0.0.0.0:9400"


# --- Kubernetes ---------------------------------------------------------------------------


def find(kind: str, name: str) -> dict[str, Any]:
    for _file, doc in manifests():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} under deploy/kubernetes")


@needs_yaml
class TestKubernetes:
    """deploy/kubernetes: manifests parse and use only what the CLI knows."""

    def test_manifests_parse(self) -> None:
        """Every document has apiVersion, kind and a name; the expected objects exist."""
        docs = manifests()
        assert docs
        for file, doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), file
            assert doc.get("metadata", {}).get("name"), file
        find("Deployment", "kv-indexer")
        find("Service", "kv-indexer")
        find("Deployment", "vllm-worker")

    def test_programs_found(self) -> None:
        """The manifests run serve and bridge (the checks below see them)."""
        kinds = [p.kind for p in manifest_programs()]
        assert SERVE in kinds and BRIDGE in kinds

    def test_flags_exist(self) -> None:
        """Every flag in a container's command or args exists in that command's parser."""
        assert check_flags(manifest_programs()) == []

    def test_env_vars_exist(self) -> None:
        """Every KV_INDEXER_* / KV_PUBLISHER_* variable set is one the program reads."""
        assert check_env(manifest_programs()) == []

    def test_commands_parse(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each container's command with its environment passes the real parser."""
        assert check_parse(manifest_programs(), monkeypatch) == []

    def test_indexer_deployment(self) -> None:
        """Replicas share Redis; gRPC probes on 50051; listens on 0.0.0.0:50051 and :9400."""
        deployment = find("Deployment", "kv-indexer")
        assert deployment["spec"]["replicas"] >= 2
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {k: v for k, v in container_env(container).items() if v is not None}
        config = parse_service_config(_argv(container.get("args")), environ=env)
        assert config.redis_url, "several replicas need the shared Redis index"
        assert config.grpc_listen == "0.0.0.0:50051"
        assert config.metrics_listen == "0.0.0.0:9400"
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == 50051, probe
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": 50051, "metrics": 9400}

    def test_indexer_service(self) -> None:
        """The Service selects the indexer pods and exposes gRPC 50051 and metrics 9400."""
        deployment = find("Deployment", "kv-indexer")
        service = find("Service", "kv-indexer")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        exposed = {p["port"]: named.get(p["targetPort"], p["targetPort"])
                   for p in service["spec"]["ports"]}
        assert exposed == {50051: 50051, 9400: 9400}

    def test_vllm_sidecar_reaches_engine(self) -> None:
        """vLLM's --kv-events-config, model and block size match the sidecar in its pod."""
        deployment = find("Deployment", "vllm-worker")
        pod = containers(deployment)
        engine = next(c for c in pod if c["image"].startswith("vllm/vllm-openai:"))
        bridges = [p for p in manifest_programs() if p.where.startswith("vllm-worker.yaml")]
        assert len(bridges) == 1 and bridges[0].kind == BRIDGE
        assert check_engine_bridge(container_argv(engine), bridges[0], "127.0.0.1") == []

    def test_pods_meet_restricted_pod_security(self) -> None:
        """Every pod passes Pod Security "restricted" (seccomp, non-root, no escalation,
        capabilities dropped); no image floats on :latest."""
        pods = {f"{file}: {doc['kind']}/{doc['metadata']['name']}": pod_spec_of(doc)
                for file, doc in manifests()}
        pods = {name: spec for name, spec in pods.items() if spec is not None}
        assert len(pods) >= 3
        assert {name: restricted_violations(spec) for name, spec in pods.items()} == {
            name: [] for name in pods}
        images = [c["image"] for _f, doc in manifests() for c in containers(doc)]
        assert images and not [i for i in images if i.endswith(":latest") or ":" not in i]

    def test_helm_service_names(self) -> None:
        """NATS and Redis URLs name the Services of the Helm releases the README installs."""
        readme = (KUBERNETES / "README.md").read_text()
        assert "helm install nats nats/nats" in readme
        assert re.search(r"helm install redis \S+/redis", readme)
        hosts = {"KV_INDEXER_NATS_URL": "nats", "KV_PUBLISHER_NATS_URL": "nats",
                 "KV_INDEXER_REDIS_URL": "redis-master"}
        seen = set()
        for program in manifest_programs():
            for name, host in hosts.items():
                value = program.env.get(name)
                if value is not None:
                    seen.add(name)
                    assert urlsplit(value).hostname == host, f"{program.where}: {name}"
        assert seen == set(hosts)


# --- Grafana ------------------------------------------------------------------------------


def exported_metrics() -> set[str]:
    """Sample names /metrics exposes, read from the exposition of everything `serve`
    registers (tests/test_dashboard.py checks the same against a live service's scrape)."""
    exporter = MetricsExporter(MemoryIndex(), ConsumerStats())
    # health and probes as `serve` passes them (their gauges appear only with them)
    exporter.health = cast(Any, SimpleNamespace(serving=True))
    exporter.probes = cast(Any, SimpleNamespace(backend_up=True, pending={0: 0}))
    EventPathMetrics(exporter.registry)
    GrpcMetrics(exporter.registry)
    InstrumentedIndex(MemoryIndex(), exporter.registry)
    register_process_metrics(exporter.registry)
    return exposed_names(generate_latest(exporter.registry).decode())


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def queried_metrics() -> set[str]:
    texts = [str(n["expr"]) for n in walk(dashboard()) if "expr" in n]
    texts += [str(n["definition"]) for n in walk(dashboard()) if "definition" in n]
    return {m for text in texts for m in re.findall(r"\bkv_indexer_[a-z0-9_]+", text)}


class TestGrafanaDashboard:
    """deploy/grafana/kv-indexer-dashboard.json over the metrics of indexer/metrics.py."""

    def test_metrics_exist(self) -> None:
        """Every kv_indexer_* series the dashboard queries is one /metrics exports."""
        assert queried_metrics() - exported_metrics() == set()

    def test_covers_the_metrics(self) -> None:
        """Events applied, drops, dead letters, gaps, resyncs, lag, blocks, degraded, workers,
        gRPC requests; lag quantiles from the histogram (not the deprecated gauge)."""
        required = {"kv_indexer_events_applied_total", "kv_indexer_dropped_total",
                    "kv_indexer_dead_letters_total", "kv_indexer_gaps_total",
                    "kv_indexer_resyncs_requested_total", "kv_indexer_event_lag_seconds_bucket",
                    "kv_indexer_worker_blocks", "kv_indexer_worker_degraded",
                    "kv_indexer_workers", "kv_indexer_grpc_requests_total",
                    "kv_indexer_grpc_request_seconds_bucket"}
        assert required - queried_metrics() == set()
        assert "kv_indexer_lag_seconds" not in queried_metrics()
        exprs = " ".join(str(n["expr"]) for n in walk(dashboard()) if "expr" in n)
        for quantile in ("histogram_quantile(0.5,", "histogram_quantile(0.99,"):
            assert quantile in exprs
        assert "by (reason)" in exprs and "tier" in exprs

    def test_panels_well_formed(self) -> None:
        """Unique panel ids, a grid position each, the datasource variable defined and used."""
        board = dashboard()
        panels = [n for n in walk(board["panels"]) if "gridPos" in n]
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids))
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        for panel in panels:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
                assert panel["targets"], panel["title"]
