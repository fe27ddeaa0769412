"""The side-by-side bench's bookkeeping (no benchmark runs here): README block, playlist checks."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from tests.bench.__main__ import PEERS_END, PEERS_HEADING, PEERS_START, update_readme
from tests.bench.bench_peers import (
    Case,
    Outcome,
    Process,
    cpu_figures,
    loop_lag_buckets,
    loop_lag_figures,
    playlist,
    playlist_uris,
    round_ratios,
)


def test_readme_block_is_created_once_then_replaced_in_place(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n## Performance\n\nIntro.\n\n### Other figures\n\nkept\n\n## Next\n\ntail\n"
    )
    update_readme("| a | b |\n", readme)
    first = readme.read_text()
    assert first.count(PEERS_START) == 1 and PEERS_HEADING in first
    # First in the section, other subsections kept after it.
    assert first.index("Intro.") < first.index(PEERS_START) < first.index("### Other figures")
    update_readme("| c | d |\n", readme)
    second = readme.read_text()
    assert second.count(PEERS_START) == second.count(PEERS_END) == 1
    assert "| c | d |" in second and "| a | b |" not in second
    assert "kept" in second and "tail" in second


def test_readme_without_a_performance_section_gets_one(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\ntext\n")
    update_readme("| a |\n", readme)
    text = readme.read_text()
    assert "\n## Performance\n" in text and PEERS_START in text and text.startswith("# x")


def test_playlist_uris_cover_uri_lines_and_uri_attributes() -> None:
    body = playlist(3, vod=True).decode() + '#EXT-X-KEY:METHOD=AES-128,URI="k.bin"\n'
    assert playlist_uris(body) == [
        "seg_vod_00001.ts",
        "seg_vod_00002.ts",
        "seg_vod_00003.ts",
        "k.bin",
    ]


def test_loop_lag_figures_from_two_readings_of_the_histogram() -> None:
    text = (
        "# HELP hlsrelay_event_loop_lag_seconds x\n"
        "# TYPE hlsrelay_event_loop_lag_seconds histogram\n"
        + "".join(
            f'hlsrelay_event_loop_lag_seconds_bucket{{le="{le}"}} {n}\n'
            for le, n in (("0.01", 90), ("0.03", 98), ("0.05", 99), ("0.1", 100), ("+Inf", 100))
        )
        + "hlsrelay_event_loop_lag_seconds_count 100\nhlsrelay_event_loop_lag_seconds_sum 0.5\n"
    )
    before = loop_lag_buckets(text)
    assert before == {0.01: 90, 0.03: 98, 0.05: 99, 0.1: 100, math.inf: 100}
    # 50 quiet samples more: nothing over 10 ms.
    quiet = {edge: n + 50 for edge, n in before.items()}
    assert loop_lag_figures(before, quiet) == {"lag_max_ms": 10.0, "stalls": 0}
    # Then two stalls between 50 and 100 ms, one of 20-30 ms.
    more = {0.01: 0, 0.03: 1, 0.05: 1, 0.1: 3, math.inf: 3}
    stalled = {edge: n + more[edge] for edge, n in quiet.items()}
    assert loop_lag_figures(quiet, stalled) == {"lag_max_ms": 100.0, "stalls": 2}
    assert loop_lag_figures(stalled, stalled) == {}  # no sample: nothing to say


def test_round_ratios_pair_each_round_with_the_peers_same_round() -> None:
    case = Case(1, "relay", "", [])
    case.outcomes["a"] = Outcome(rounds=[{"mb_s": 100.0}, {"mb_s": 90.0}, {"mb_s": 120.0}])
    case.outcomes["b"] = Outcome(rounds=[{"mb_s": 100.0}, {"mb_s": 60.0}, {"mb_s": 150.0}])
    each = round_ratios(case, "mb_s", "a", "b")
    assert each is not None
    assert (each.low, each.median, each.high, each.rounds) == (0.8, 1.0, 1.5, 3)
    # Medians alone would say 100 / 100: the rounds say one run moved it from 0.8x to 1.5x.
    case.outcomes["c"] = Outcome(failure="wrong bytes")
    assert round_ratios(case, "mb_s", "a", "c") is None  # a failed peer has no rounds to pair
    case.outcomes["d"] = Outcome(rounds=[{"mb_s": 100.0}])
    assert round_ratios(case, "mb_s", "a", "d") is None  # rounds that do not pair up
    assert round_ratios(case, "rps", "a", "b") is None  # a figure the rounds lack


def test_cpu_figures_per_request_and_nothing_without_requests() -> None:
    assert cpu_figures(0.5, 1_000) == {"cpu_us": 500.0}
    assert cpu_figures(1.0, 0) == {}
    case = Case(1, "relay", "", [])
    case.outcomes["a"] = Outcome(rounds=[{"mb_s": 1.0}, {"mb_s": 2.0, "cpu_us": 3.0}])
    case.outcomes["b"] = Outcome(failure="wrong bytes")
    assert case.has("cpu_us")
    assert not case.has("cpu_pct")


def test_cpu_seconds_counts_a_real_process_time_on_the_cpu(tmp_path: Path) -> None:
    # Spins for 0.4 s of CPU, then sleeps until stopped: its count grows by the spin only.
    spin = (
        "import sys, time\n"
        "end = time.process_time() + 0.4\n"
        "while time.process_time() < end: pass\n"
        "print('spun', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", spin], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        process = Process("spinner", proc, tmp_path / "spinner.log", [sys.executable])
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"spun\n"
        used = process.cpu_seconds()
        assert 0.35 <= used < 2.0
        # Asleep now: no more CPU time.
        assert process.cpu_seconds() - used < 0.05
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
