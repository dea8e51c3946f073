"""The Pod Security Standards' "restricted" profile (baseline included), checked on a pod
spec as the admission controller checks it (kubernetes.io/docs/concepts/security/
pod-security-standards, the rules in force since Kubernetes 1.25)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

RESTRICTED_VOLUMES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                                "persistentVolumeClaim", "projected", "secret"})
SAFE_SYSCTLS = frozenset({"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                          "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                          "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                          "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                          "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"})
SECCOMP_TYPES = frozenset({"RuntimeDefault", "Localhost"})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t",
                           "container_engine_t"})


def pod_spec_of(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a Pod or of a workload's pod template, None for other kinds."""
    if doc.get("kind") == "Pod":
        return dict(doc["spec"])
    if doc.get("kind") == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    template = doc.get("spec", {}).get("template")
    return dict(template["spec"]) if template else None


def _containers(spec: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for group in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(group, [])


def _effective(spec: Mapping[str, Any], container: Mapping[str, Any], *path: str) -> Any:
    """A container's security setting, else the pod's (container wins, as in the kubelet)."""
    for context in (container.get("securityContext") or {},
                    spec.get("securityContext") or {}):
        node: Any = context
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None:
            return node
    return None


def restricted_violations(spec: Mapping[str, Any]) -> list[str]:
    """Every rule of the restricted profile this pod spec breaks, one line each."""
    problems = [f"host namespace {key}" for key in ("hostNetwork", "hostPID", "hostIPC")
                if spec.get(key)]
    problems += [f"volume {v.get('name')}: type not allowed"
                 for v in spec.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    pod_context = spec.get("securityContext") or {}
    problems += [f"unsafe sysctl {s.get('name')}" for s in pod_context.get("sysctls", [])
                 if s.get("name") not in SAFE_SYSCTLS]
    for container in _containers(spec):
        problems += [f"{container.get('name')}: {p}" for p in _container_violations(spec,
                                                                                    container)]
    return problems


def _container_violations(spec: Mapping[str, Any], container: Mapping[str, Any]) -> list[str]:
    context = container.get("securityContext") or {}
    problems = []
    if context.get("privileged"):
        problems.append("privileged")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    capabilities = context.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append("capabilities do not drop ALL")
    if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
        problems.append(f"capabilities add {capabilities.get('add')}")
    if _effective(spec, container, "runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    if _effective(spec, container, "runAsUser") == 0:
        problems.append("runAsUser is 0")
    if _effective(spec, container, "seccompProfile", "type") not in SECCOMP_TYPES:
        problems.append("seccompProfile is not RuntimeDefault or Localhost")
    if context.get("procMount", "Default") != "Default":
        problems.append("procMount")
    if _effective(spec, container, "seLinuxOptions", "type") not in (None, *SELINUX_TYPES):
        problems.append("seLinuxOptions type")
    problems += [f"hostPort {p['hostPort']}" for p in container.get("ports", [])
                 if p.get("hostPort")]
    return problems
