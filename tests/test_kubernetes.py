"""configs/kubernetes/ for real, offline: every manifest against the Kubernetes schemas
(kubernetes-validate), the ConfigMap's TOML through `trio-echo check-config`, and the manifests
checked against that configuration (probe ports and paths, Service ports, the grace period, the
token file's mount, the restricted security context)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from trio_echo.addresses import parse_address

DIR = Path(__file__).resolve().parent.parent / "configs" / "kubernetes"
KUBERNETES = "1.31"  # the oldest version still supported upstream when these were written


def documents() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


@pytest.mark.parametrize("path", sorted(DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_each_manifest_is_valid_for_kubernetes(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)  # raises on any problem


def test_the_validator_would_catch_a_mistake() -> None:
    deployment = documents()["Deployment"]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "echo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_configmap_is_a_valid_config_and_the_manifests_agree_with_it(tmp_path: Path) -> None:
    kinds = documents()
    assert set(kinds) == {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"}
    text = kinds["ConfigMap"]["data"]["trio-echo.toml"]
    (tmp_path / "trio-echo.toml").write_text(text)
    checked = subprocess.run(
        [sys.executable, "-m", "trio_echo", "check-config", str(tmp_path / "trio-echo.toml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    effective = tomllib.loads(checked.stdout)
    limits, admin = effective["limits"], effective["admin"]

    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {port["name"]: port for port in container["ports"]}
    admin_port = parse_address(admin["listen"]).port
    assert parse_address(admin["listen"]).host == "0.0.0.0"  # reachable by the kubelet's probes
    assert ports["admin"]["containerPort"] == admin_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    echo = [parse_address(entry) for entry in effective["server"]["listen"]]
    assert {(a.transport, a.port) for a in echo} == {("tcp", 40007), ("udp", 40007), ("http", 8080)}
    assert (ports["echo-tcp"]["containerPort"], ports["echo-tcp"]["protocol"]) == (40007, "TCP")
    assert (ports["echo-udp"]["containerPort"], ports["echo-udp"]["protocol"]) == (40007, "UDP")
    assert (ports["web"]["containerPort"], ports["web"]["protocol"]) == (8080, "TCP")
    service = {port["name"]: port for port in kinds["Service"]["spec"]["ports"]}
    assert {name: (p["port"], p["protocol"]) for name, p in service.items()} == {
        "echo-tcp": (40007, "TCP"),
        "echo-udp": (40007, "UDP"),
        "web": (8080, "TCP"),
        "admin": (admin_port, "TCP"),
    }
    # SIGTERM to SIGKILL must cover the whole stop: not ready, drain, lingering closes.
    stop = limits["drain_delay"] + limits["drain_timeout"] + limits["linger_timeout"]
    assert pod["terminationGracePeriodSeconds"] > stop
    assert limits["drain_delay"] >= 2 * container["readinessProbe"]["periodSeconds"]
    # The token file is the Secret's key, mounted where the config reads it.
    token_file = Path(admin["token_file"])
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert mounts["admin-token"] == str(token_file.parent)
    assert volumes["admin-token"]["secret"]["secretName"] == kinds["Secret"]["metadata"]["name"]
    assert token_file.name in kinds["Secret"]["stringData"]
    assert mounts["config"] == container["args"][container["args"].index("--config") + 1]


def test_the_pod_runs_restricted_and_sized_for_its_connections() -> None:
    kinds = documents()
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    config = tomllib.loads(kinds["ConfigMap"]["data"]["trio-echo.toml"])
    # docs/performance.md: 4.4 KB per idle connection, ~32 MB for a fresh process.
    needed = 32 * 2**20 + config["limits"]["max_connections"] * 4.4 * 1000
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    assert int(limit[:-2]) * 2**20 > needed
    assert kinds["PodDisruptionBudget"]["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]
