"""Observability with real components: the exposition after traffic (promtool), the shipped alert
rules and dashboard against it, a real Prometheus scraping a running hlsrelay, and the request
logs of a real ``hlsrelay serve`` process."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from proxy.web.keys import RELAY
from tests.integration.test_serve_process import serve, stream_url
from tests.integration.test_streams import follow, proxied_uris
from tests.origin import Origin
from tests.procs import free_port
from tests.prometheus import MissingBinary, binary, prometheus_server

Client = TestClient[Any, Any]
REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "hlsrelay.json"
SEGMENT = b"\x47" * 188 * 50
METRIC_NAME = re.compile(r"\bhlsrelay_[a-z0-9_]+")


def need(name: str) -> str:
    try:
        return binary(name)
    except MissingBinary as exc:
        pytest.skip(str(exc))


async def run(*args: str, stdin: bytes = b"") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def drive_traffic(client: Client, origin: Origin) -> None:
    """Requests of every sort: a playlist, a segment, an upstream error, a 404, health."""
    origin.playlist("/obs/index.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\nseg.ts\n")
    origin.media("/obs/seg.ts", SEGMENT)
    origin.status("/obs/broken.ts", 500)
    relay = client.app[RELAY]
    playlist_path = relay.mint(f"{origin.url}/obs/index.m3u8", {})
    playlist = await client.get(playlist_path)
    assert playlist.status == 200
    (child,) = proxied_uris(await playlist.text())
    segment = await follow(client, playlist_path, child)
    assert await segment.read() == SEGMENT
    assert (await client.get(relay.mint(f"{origin.url}/obs/broken.ts", {}))).status == 502
    assert (await client.get("/no/such/route")).status == 404
    assert (await client.get("/healthz")).status == 200


def exposition_names(text: str) -> set[str]:
    """Every sample name the exposition can hold, samples or not (labelled families without
    children have only their HELP and TYPE lines): histograms give _bucket/_sum/_count."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"),
            "info": ("_info",),
        }.get(family.type, ())
        names.update(family.name + suffix for suffix in suffixes)
    return names


def dashboard_exprs(variables: bool = True) -> list[str]:
    """PromQL of every panel, and (``variables``) the variable queries (Grafana's own syntax)."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    if variables:
        exprs += [v["definition"] for v in doc["templating"]["list"]]
    return exprs


def alert_exprs() -> list[str]:
    # The rules file is YAML; no YAML parser is a dependency, so read the expr blocks by hand
    # (promtool parses the file for real in test_promtool_checks_the_alert_rules).
    exprs, current = [], None
    for line in ALERTS.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("expr:"):
            rest = stripped.removeprefix("expr:").strip()
            if rest == "|":
                current = []
                exprs.append(current)
            else:
                exprs.append([rest])
                current = None
        elif current is not None:
            if re.match(r"\s*(for|labels|annotations|- alert):?", line) and not line.startswith(
                " " * 12
            ):
                current = None
            else:
                current.append(stripped)
    return [" ".join(e) for e in exprs]


async def test_exposition_after_traffic_passes_promtool(proxy: Client, origin: Origin) -> None:
    promtool = need("promtool")
    await drive_traffic(proxy, origin)
    text = await (await proxy.get("/metrics")).text()
    code, output = await run(promtool, "check", "metrics", stdin=text.encode())
    assert code == 0, output
    # Bytes in from the origin and out to the viewer, counted per resource kind.
    assert f'hlsrelay_upstream_received_bytes_total{{kind="media"}} {float(len(SEGMENT))}' in text
    assert f'hlsrelay_relayed_bytes_total{{kind="media"}} {float(len(SEGMENT))}' in text
    assert 'hlsrelay_relayed_bytes_total{kind="playlist"}' in text
    assert 'hlsrelay_http_requests_total{route="stream",status_class="5xx"} 1.0' in text
    assert 'hlsrelay_http_requests_total{route="unmatched",status_class="4xx"} 1.0' in text
    assert 'hlsrelay_build_info{python="' in text
    assert "process_resident_memory_bytes" in text
    assert origin.url.split("//")[1] not in text


def _hold_the_loop(seconds: float) -> None:
    """A blocking call on the event loop's thread, the kind of stall the lag metric is for."""
    time.sleep(seconds)


def _lag_samples(text: str) -> dict[str, float]:
    (family,) = [
        f
        for f in text_string_to_metric_families(text)
        if f.name == "hlsrelay_event_loop_lag_seconds"
    ]
    return {
        s.labels.get("le", s.name.rsplit("_", 1)[-1]): s.value
        for s in family.samples
        if not s.name.endswith("_created")
    }


async def test_event_loop_lag_of_the_app_moves_when_its_loop_is_blocked(
    proxy_factory: Callable[..., Awaitable[Client]],
) -> None:
    client = await proxy_factory()
    await asyncio.sleep(0.05)
    before = _lag_samples(await (await client.get("/metrics")).text())
    assert before["count"] >= 2  # the sampler runs from start-up
    assert before["+Inf"] - before["0.05"] == 0  # nothing stalls an idle test app
    _hold_the_loop(0.2)  # the app's handlers and its sampler share this loop
    await asyncio.sleep(0.03)
    after = _lag_samples(await (await client.get("/metrics")).text())
    assert after["count"] > before["count"]
    assert after["+Inf"] - after["0.1"] == 1  # one wake-up came between 100 and 250 ms late
    assert after["0.25"] == after["+Inf"]
    assert any(t.get_name() == "hlsrelay-loop-lag" for t in asyncio.all_tasks())
    await client.close()
    # Stopped with the app: no task is left behind.
    assert not any(t.get_name() == "hlsrelay-loop-lag" for t in asyncio.all_tasks())


async def test_promtool_checks_the_alert_rules() -> None:
    promtool = need("promtool")
    code, output = await run(promtool, "check", "rules", str(ALERTS))
    assert code == 0, output
    assert "SUCCESS: 9 rules found" in output


async def test_alert_rules_fire_on_synthetic_series() -> None:
    """deploy/prometheus/alerts_test.yml: stalled channel, restart storm, proxies down, error
    ratio (and not when idle), p99 latency (raw-TS viewers left out), instance down."""
    promtool = need("promtool")
    code, output = await run(promtool, "test", "rules", str(ALERTS.with_name("alerts_test.yml")))
    assert code == 0, output


async def test_every_metric_of_dashboard_and_alerts_is_exposed(
    proxy: Client, origin: Origin
) -> None:
    await drive_traffic(proxy, origin)
    exposed = exposition_names(await (await proxy.get("/metrics")).text())
    used = {
        "dashboard": {n for e in dashboard_exprs() for n in METRIC_NAME.findall(e)},
        "alerts": {n for e in alert_exprs() for n in METRIC_NAME.findall(e)},
    }
    assert len(used["dashboard"]) > 20
    assert len(used["alerts"]) >= 7
    for where, names in used.items():
        missing = sorted(names - exposed)
        assert not missing, f"{where} uses metrics hlsrelay does not expose: {missing}"


def test_dashboard_structure() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "hlsrelay"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    provisioned = (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    uid = re.search(r"uid:\s*(\S+)", provisioned)
    assert uid is not None
    for panel in doc["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid.group(1), panel["title"]
            assert panel["targets"], panel["title"]
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for topic in ("route", "first byte", "bytes/s", "hit ratio", "coalesced", "proxy", "viewers",
                  "restarts", "segment age", "event-loop lag", "resident memory"):  # fmt: skip
        assert topic in titles, topic
    provider = (REPO / "deploy/grafana/provisioning/dashboards/hlsrelay.yml").read_text()
    assert "/var/lib/grafana/dashboards/hlsrelay" in provider


async def test_real_prometheus_scrapes_hlsrelay(proxy: Client, origin: Origin) -> None:
    need("prometheus")
    target = f"127.0.0.1:{proxy.server.port}"
    async with prometheus_server([target], rule_files=[ALERTS]) as prom:
        await drive_traffic(proxy, origin)
        series = 'hlsrelay_http_requests_total{job="hlsrelay",route="stream"}'
        counted = 0.0
        for _ in range(100):  # scrapes every second: a few seconds at most
            result = await prom.query(f"sum({series})")
            counted = float(result[0]["value"][1]) if result else 0.0
            if counted >= 3:
                break
            await asyncio.sleep(0.1)
        assert counted >= 3
        # Traffic moves the counter Prometheus sees.
        for _ in range(5):
            await proxy.get("/healthz")
            await proxy.get(proxy.app[RELAY].mint(f"{origin.url}/obs/index.m3u8", {}))
        for _ in range(100):
            result = await prom.query(f"sum({series})")
            if float(result[0]["value"][1]) >= counted + 5:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"counter did not move past {counted}: {result}")
        up = await prom.query('up{job="hlsrelay"}')
        assert up[0]["value"][1] == "1"
        # Every dashboard expression is valid PromQL (the server parses and runs it).
        for expr in dashboard_exprs(variables=False):
            await prom.query(expr.replace("$__rate_interval", "1m").replace("$instance", ".*"))
        # The shipped rules load and evaluate without error.
        for _ in range(50):
            groups = (await prom.api("/api/v1/rules"))["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if (
                rules
                and all(r.get("lastEvaluation", "").startswith("2") for r in rules)
                and all(r["health"] == "ok" for r in rules)
            ):
                break
            await asyncio.sleep(0.2)
        assert len(rules) >= 7
        assert all(r["health"] == "ok" for r in rules), [
            (r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"
        ]


async def _log_lines(origin: Origin, log_format: str) -> tuple[list[str], dict[str, str]]:
    """Run ``hlsrelay serve``, send requests carrying secrets, stop it; its output lines."""
    origin.media("/logs/seg.ts?sig=UPSTREAM-SIGNATURE", SEGMENT)
    origin.media("/logs/seg.ts", SEGMENT)
    port = free_port()
    api_key = "API-KEY-SECRET-0123456789"
    env = (("HLSRELAY_SERVER__LOG_FORMAT", log_format),
           ("HLSRELAY_SECURITY__API_KEYS", json.dumps([api_key])))  # fmt: skip
    echoed: dict[str, str] = {}
    async with serve(port, *env) as proc, aiohttp.ClientSession() as session:
        url = stream_url(
            port, f"{origin.url}/logs/seg.ts?sig=UPSTREAM-SIGNATURE", {"Cookie": "c=ORIGIN-COOKIE"}
        )
        async with session.get(
            url + "?viewer=QUERY-SECRET",
            headers={"X-Request-Id": "edge-req-42", "Cookie": "v=VIEWER-COOKIE"},
        ) as resp:
            assert resp.status == 200
            assert await resp.read() == SEGMENT
            echoed["good"] = resp.headers["X-Request-Id"]
        async with session.get(url, headers={"X-Request-Id": "edge-req-43"}) as resp:
            assert await resp.read() == SEGMENT
        async with session.get(
            f"http://127.0.0.1:{port}/proxy.m3u8",
            params={"url": f"{origin.url}/logs/index.m3u8?token=URL-SECRET", "api_key": api_key},
            headers={"X-Request-Id": 'forged","status":200'},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 302
            echoed["forged"] = resp.headers["X-Request-Id"]
        async with session.post(
            f"http://127.0.0.1:{port}/api/v1/streams",
            json={"url": f"{origin.url}/x.m3u8", "headers": {"Cookie": "k=BODY-COOKIE"}},
            headers={"Authorization": f"Bearer {api_key}"},
        ) as resp:
            assert resp.status == 201
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert proc.stdout is not None
        output = (await proc.stdout.read()).decode()
    for secret in ("UPSTREAM-SIGNATURE", "ORIGIN-COOKIE", "QUERY-SECRET", "VIEWER-COOKIE",
                   "URL-SECRET", api_key, "BODY-COOKIE", url.split("/s/")[1][:30]):  # fmt: skip
        assert secret not in output, secret
    return output.splitlines(), echoed


async def test_json_request_logs_of_a_real_process(origin: Origin) -> None:
    lines, echoed = await _log_lines(origin, "json")
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    access = [d for d in docs if d["logger"] == "aiohttp.access"]
    by_route = {d["route"]: d for d in access}
    stream, again = (d for d in access if d["route"] == "stream")
    assert (stream["cache"], again["cache"]) == ("miss", "hit")
    assert again["upstream_host"] == "127.0.0.1"  # the stream's upstream, though not contacted
    assert stream["request_id"] == "edge-req-42" == echoed["good"]
    assert stream["status"] == 200
    assert stream["bytes"] > len(SEGMENT)  # on the wire: headers included
    assert stream["duration_ms"] > 0
    assert stream["upstream_host"] == "127.0.0.1"  # the host alone: no port, path or query
    assert stream["path"] == "/s/…/seg.ts"
    assert stream["method"] == "GET"
    assert {"time", "level"} <= set(stream)
    # A request id that is not a plain token is replaced by a fresh one, never logged as sent.
    redirect = by_route["proxy_m3u8"]
    assert redirect["request_id"] == echoed["forged"]
    assert re.fullmatch(r"[0-9a-f]{16}", redirect["request_id"])
    assert redirect["path"] == "/proxy.m3u8"
    assert redirect["status"] == 302
    assert by_route["api_streams"]["status"] == 201
    assert by_route["healthz"]["upstream_host"] == ""


async def test_text_request_logs_of_a_real_process(origin: Origin) -> None:
    lines, _ = await _log_lines(origin, "text")
    stream = [line for line in lines if " stream 200 " in line]
    assert len(stream) == 2
    assert "GET /s/…/seg.ts stream 200" in stream[0]
    assert "up=127.0.0.1 cache=miss id=edge-req-42" in stream[0]
    assert not any(line.startswith("{") for line in lines)
