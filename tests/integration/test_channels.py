"""``/channels.m3u`` and ``/api/v1/channels`` over the real app, lists from a file and a URL."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.channels.m3u import M3uEntry, parse_m3u
from proxy.web.keys import CHANNELS
from tests.conftest import ProxyFactory
from tests.origin import Origin

HASH = "0123456789abcdef0123456789abcdef01234567"


async def wait_for_channels(client: TestClient[Any, Any], count: int) -> None:
    for _ in range(100):
        if len(client.app[CHANNELS]) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"only {len(client.app[CHANNELS])} channels loaded")


async def test_channel_list_and_json(
    proxy_factory: ProxyFactory, origin: Origin, tmp_path: Path
) -> None:
    listed = tmp_path / "list.m3u"
    listed.write_text(
        "#EXTM3U\n"
        '#EXTINF:-1 tvg-id="news.tv" tvg-logo="http://logo/n.png" group-title="News" '
        'catchup="shift" catchup-source="http://cdn.example/n?utc={utc}&token=SECRET-TOKEN",'
        "News\n"
        "#EXTVLCOPT:http-referrer=https://site.example/\n"
        "http://cdn.example/news/index.m3u8?token=SECRET-TOKEN\n"
        "#EXTINF:-1,Sport\n"
        f"acestream://{HASH}\n"
    )
    origin.playlist(
        "/get.php",
        '#EXTM3U\n#EXTINF:-1 tvg-id="x1",Xtream One\nhttp://p.example/live/u/p/1\n',
        content_type="audio/x-mpegurl",
    )
    client = await proxy_factory(
        channels=[
            {"id": "demo", "name": "Demo", "url": "lavfi:testsrc2", "group": "Test"},
            {"id": "news.tv", "url": "http://other.example/n.ts"},
        ],
        channel_lists=[
            {"path": str(listed), "refresh_interval": 0},
            {"url": f"{origin.url}/get.php?username=u&password=p", "refresh_interval": 0},
        ],
    )
    await wait_for_channels(client, 5)

    resp = await client.get("/channels.m3u")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("audio/x-mpegurl")
    text = await resp.text()
    assert "SECRET-TOKEN" not in text and "cdn.example" not in text
    entries: dict[str, M3uEntry] = {}
    for entry in parse_m3u(text).entries:
        entries.setdefault(entry.attribute("tvg-id"), entry)
    base = str(client.make_url("")).rstrip("/")
    assert entries["demo"].url == f"{base}/live/demo/index.m3u8"
    # The listed news.tv collides with the configured one: numbered, config wins the id.
    assert entries["news.tv"].url == f"{base}/live/news.tv/index.m3u8"
    news = next(e for e in parse_m3u(text).entries if e.url.endswith("/news.tv-2/index.m3u8"))
    assert news.attribute("catchup") == "shift" and news.group == "News"
    assert news.attribute("tvg-logo") == "http://logo/n.png"
    xtream = origin.requests_to("/get.php")[0]
    assert "type=m3u_plus" in xtream.query_string

    ts_list = await (await client.get("/channels.m3u?format=ts")).text()
    assert f"{base}/live/demo.ts" in ts_list

    resp = await client.get("/api/v1/channels")
    assert resp.status == 200
    doc = await resp.json()
    by_id = {c["id"]: c for c in doc["channels"]}
    assert set(by_id) == {"demo", "news.tv", "news.tv-2", "sport", "x1"}
    assert by_id["sport"]["kind"] == "ts"
    assert by_id["x1"]["kind"] == "ts"  # Xtream list asked for TS output
    assert by_id["news.tv-2"]["kind"] == "hls"
    assert by_id["demo"] == {
        "id": "demo",
        "name": "Demo",
        "logo": None,
        "group": "Test",
        "kind": "ts",
        "playlist_url": f"{base}/live/demo/index.m3u8",
        "ts_url": f"{base}/live/demo.ts",
        "state": "idle",
        "viewers": 0,
    }
    assert "SECRET-TOKEN" not in await resp.text()

    resp = await client.get("/live/nope/index.m3u8")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_hls_channel_redirects_into_the_core(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    origin.playlist("/hls/index.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\nseg1.ts\n")
    origin.media("/hls/seg1.ts", b"\x47" * 188)
    client = await proxy_factory(
        channels=[
            {
                "id": "h",
                "url": f"{origin.url}/hls/index.m3u8",
                "headers": {"Referer": "https://site.example/"},
            }
        ]
    )
    resp = await client.get("/live/h/index.m3u8", allow_redirects=False)
    assert resp.status == 302
    location = resp.headers["Location"]
    assert location.startswith("/s/") and location.endswith("/index.m3u8")
    resp = await client.get("/live/h/index.m3u8")
    assert resp.status == 200
    body = await resp.text()
    child = next(line for line in body.splitlines() if line and not line.startswith("#"))
    seg = await client.session.get(resp.url.join(URL(child)))
    assert seg.status == 200 and await seg.read() == b"\x47" * 188
    assert all(r.headers.get("Referer") == "https://site.example/" for r in origin.seen)


async def test_kind_is_probed_when_the_url_does_not_tell(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    origin.playlist(
        "/p/chan", "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\ns.ts\n", content_type="text/plain"
    )
    client = await proxy_factory(channels=[{"id": "p", "url": f"{origin.url}/p/chan"}])
    resp = await client.get("/live/p/index.m3u8", allow_redirects=False)
    assert resp.status == 302
    doc = await (await client.get("/api/v1/channels")).json()
    assert doc["channels"][0]["kind"] == "hls"
