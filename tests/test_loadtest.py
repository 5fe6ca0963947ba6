"""``media-bridge loadtest``: real bridge process, real emulator, simulated callers; the report's figures."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from bridge.loadtest import (
    AudioIndex,
    CallResult,
    LoadTest,
    Options,
    analyze_call,
    explain_mismatch,
    integrity_summary,
    main,
    split_utterances,
)
from bridge.loadtest.html_report import render_html

pytestmark = pytest.mark.timeout(90)

CHROMIUM = "/usr/bin/chromium"


def _run(opts: Options) -> tuple[LoadTest, dict]:
    lt = LoadTest(opts)
    report = asyncio.run(lt.run())
    return lt, report


@pytest.fixture(scope="module")
def short_load(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoadTest, dict, Path]]:
    out = tmp_path_factory.mktemp("lt20")
    lt, report = _run(Options(calls=20, ramp_s=2.0, duration_s=5.0, scenario="talk", report=str(out),
                              progress=False, timeout_s=60))
    yield lt, report, out
    # Finalise the run's sockets and tasks now, while no event loop runs, not during a later module's test.
    del lt, report
    gc.collect()


# ------------------------------------------------------------------ end to end


def test_short_load_all_complete_and_figures_sane(short_load: tuple[LoadTest, dict, Path]) -> None:
    _lt, report, out = short_load
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["schema"] == "media-bridge-loadtest/1"
    calls = on_disk["calls"]
    assert (calls["attempted"], calls["connected"], calls["completed"], calls["failed"]) == (20, 20, 20, 0), calls
    assert calls["protocol_errors"] == 0
    assert not on_disk["timed_out"]

    integ = on_disk["integrity"]
    assert integ["checked"] and integ["mismatches"] == 0, integ
    assert integ["utterances_ok"] >= 20  # every greeting heard whole, byte for byte

    ttfa = on_disk["caller"]["ttfa_ms"]
    assert ttfa["count"] >= 40  # greeting + at least one DTMF turn per call
    # Emulator TTFB is 90 ms (+ up to 10 ms jitter): the caller cannot hear it sooner, nor much later at 20 calls.
    assert 85 <= ttfa["p50"] <= ttfa["p95"] <= ttfa["p99"] < 1000, ttfa
    fwd = on_disk["bridge_metrics"]["forwarding_delay_ms"]
    assert fwd["count"] > 100 and fwd["p50"] is not None and 0 < fwd["p50"] <= fwd["p99"] < 200, fwd
    assert on_disk["bridge_metrics"]["active_calls_at_end"] == 0

    assert on_disk["caller"]["underruns"]["count"] == 0, on_disk["caller"]["underruns"]
    jit = on_disk["caller"]["jitter_ms"]
    assert jit["count"] > 100 and 0 <= jit["p50"] <= jit["p99"] < 1000

    bridge = on_disk["bridge"]
    assert bridge["measured"] and bridge["cpu_percent"]["max"] > 0
    assert bridge["rss_mb"]["peak"] > 10
    assert bridge["per_call"]["peak_active_calls"] == 20
    assert bridge["exit_code"] == 0
    assert len(on_disk["timeseries"]) >= 4
    assert (out / "report.html").stat().st_size > 2000


def test_integrity_check_fails_on_one_corrupted_byte_of_a_real_call(short_load: tuple[LoadTest, dict, Path]) -> None:
    lt, _report, _out = short_load
    res = next(r for r in lt.results if r.call is not None and len(r.call.record.received_audio) > 4000)
    rec = res.call.record
    clean = CallResult(res.index, triggers=res.triggers, call=res.call)
    analyze_call(clean, lt.audio_index())
    assert integrity_summary([clean], AudioIndex())["mismatches"] == 0
    assert all(s.status != "mismatch" for s in clean.spans)

    rec.received_audio[3000] ^= 0x01  # one bit of one byte, mid-utterance
    try:
        bad = CallResult(res.index, triggers=res.triggers, call=res.call)
        analyze_call(bad, lt.audio_index())
        summary = integrity_summary([bad], AudioIndex())
        assert summary["mismatches"] == 1, summary
        assert summary["mismatch_examples"][0]["start"] <= 3000 < summary["mismatch_examples"][0]["end"]
    finally:
        rec.received_audio[3000] ^= 0x01


def test_underruns_counted_when_the_bridge_is_stalled(tmp_path: Path) -> None:
    stalled: dict[str, float] = {}

    async def stall(lt: LoadTest) -> None:
        # Wait until all 4 calls hear the long passage (greeting ~3 s, then DTMF 9: a second audio
        # start), then 0.5 s more so its playout is steady: on a busy machine a fixed instant could
        # fall in the quiet gap between the turns, where a stall is no underrun.
        deadline = lt.t0 + 9.0
        while time.monotonic() < deadline and not all(len(r.live_ttfa) >= 2 for r in lt.results):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert lt.bridge is not None
        os.kill(lt.bridge.pid, signal.SIGSTOP)
        stalled["at"] = time.monotonic()
        try:
            await asyncio.sleep(0.5)
        finally:
            os.kill(lt.bridge.pid, signal.SIGCONT)

    _lt, report = _run(Options(calls=4, ramp_s=0.3, duration_s=8.0, scenario="talk", report=str(tmp_path),
                               progress=False, timeout_s=60, during=stall))
    assert "at" in stalled
    assert report["calls"]["completed"] == 4, report["calls"]
    assert report["integrity"]["mismatches"] == 0, report["integrity"]
    under = report["caller"]["underruns"]
    # 500 ms stopped, minus the <= 300 ms lead the caller had buffered: 200-500 ms of silence per call.
    assert under["count"] >= 1 and under["calls_affected"] >= 1, under
    assert 50 <= under["max_ms"] <= 700, under
    assert under["total_ms"] <= 4 * 700, under


# ------------------------------------------------------------ unit: integrity


def _index(*audios: bytes) -> AudioIndex:
    idx = AudioIndex()
    for i, a in enumerate(audios):
        idx.add(f"ctx{i}", a)
    return idx


def _padded(a: bytes) -> bytes:
    return a + b"\xff" * (-len(a) % 160)


A = bytes((i * 7 + 3) % 255 for i in range(1000))  # 6.25 frames
B = bytes((i * 13 + 1) % 254 for i in range(480))  # exactly 3 frames


def test_split_exact_utterances_and_a_corrupted_byte() -> None:
    stream = _padded(A) + _padded(B) + _padded(A)
    spans = split_utterances(stream, [], _index(A, B))
    assert [(s.status, s.start, s.end) for s in spans] == [
        ("ok", 0, 1120), ("ok", 1120, 1600), ("ok", 1600, 2720)]

    for pos in (5, 700, 1119, 1300):  # first frame, middle, padding, second utterance
        bad = bytearray(stream)
        bad[pos] ^= 0x40
        spans = split_utterances(bytes(bad), [], _index(A, B))
        mism = [s for s in spans if s.status == "mismatch"]
        assert len(mism) == 1 and mism[0].start <= pos < mism[0].end, (pos, spans)
        assert sum(s.status == "ok" for s in spans) == 2  # resynchronised on the next utterance


def test_a_mismatch_is_explained_by_the_closest_context_and_where_they_part() -> None:
    bad = bytearray(_padded(A))
    bad[700] ^= 0x40  # inside the fifth frame
    idx = _index(A, B)
    (span,) = [s for s in split_utterances(bytes(bad), [], idx) if s.status == "mismatch"]
    why = explain_mismatch(bytes(bad), span, idx)
    assert why["closest_contexts"] == ["ctx0"] and why["closest_audio_bytes"] == len(A)
    assert why["same_for_bytes"] == 640, "four whole frames agree, the fifth differs"
    assert why["first_frame_known"] is True
    stranger = bytes(320)
    (span,) = split_utterances(stranger, [], idx)
    assert explain_mismatch(stranger, span, idx) == {"bytes": 320, "first_frame_known": False}


def test_split_interrupted_by_clear_and_cut_by_hangup() -> None:
    stream = A[:480] + _padded(B) + A[:320]
    spans = split_utterances(stream, [480], _index(A, B))
    assert [s.status for s in spans] == ["interrupted", "ok", "cut"]
    # Audio after a clear that is not a prefix of anything is a mismatch, not "interrupted".
    spans = split_utterances(A[:480] + bytes(160) + _padded(B), [480], _index(A, B))
    assert [s.status for s in spans] == ["interrupted", "mismatch", "ok"]
    # An utterance missing its padding (or with garbage in it) is a mismatch.
    spans = split_utterances(A + b"\x00" * 120 + _padded(B), [], _index(A, B))
    assert spans[0].status == "mismatch"


def test_underrun_only_inside_an_utterance_and_jitter() -> None:
    idx = _index(A, B)
    stream = _padded(A) + _padded(B)
    rec = SimpleNamespace(
        received_audio=bytearray(stream), clear_offsets=[], protocol_errors=[],
        # (arrival, offset, length, dry seconds before it)
        arrivals=[(10.0, 0, 800, 0.0), (10.2, 800, 320, 0.25),  # dry 250 ms inside A: underrun
                  (11.0, 1120, 480, 0.66)],  # dry before B starts: a pause between turns, not an underrun
    )
    res = CallResult(0, triggers=[(9.9, "greeting"), (10.9, "dtmf")], call=SimpleNamespace(record=rec))
    analyze_call(res, idx)
    assert res.underruns == [0.25]
    assert res.underrun_at_s == [(0, 0.1)], "in the first utterance, after its first 100 ms"
    assert [round(v, 3) for _k, v in res.ttfa_s] == [0.1, 0.1]
    assert res.jitter_s and abs(res.jitter_s[0] - 0.1) < 1e-9  # 200 ms apart for 100 ms of audio


# ---------------------------------------------------------------- HTML report


def _png_colours(png: bytes, limit: int = 64) -> int:
    """Distinct pixel colours of an 8-bit RGB/RGBA PNG (no Pillow here), up to ``limit``."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", 0
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", data[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += data
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = w * bpp
    prev = bytearray(stride)
    colours: set[bytes] = set()
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = line
        if y % 8 == 0:
            for x in range(0, stride, bpp * 3):
                colours.add(bytes(line[x:x + 3]))
            if len(colours) >= limit:
                break
    return len(colours)


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: apt-get install chromium")
def test_html_report_renders_charts_in_headless_chromium(short_load: tuple[LoadTest, dict, Path],
                                                         tmp_path: Path) -> None:
    _lt, _report, out = short_load
    page = out / "report.html"
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "<script" not in text

    dom = _chromium(["--dump-dom", page.as_uri()], tmp_path / "p1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert html.count("<svg") >= 7, html[:500]
    assert html.count('class="bar"') >= 5  # latency histograms drew bars
    assert html.count('class="series"') >= 3  # time series drew lines
    assert 'id="summary"' in html and "Audio integrity mismatches" in html

    shot = tmp_path / "report.png"
    r = _chromium([f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars", page.as_uri()],
                  tmp_path / "p2")
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    assert _png_colours(shot.read_bytes()) >= 8  # not blank: text, bars and lines in several colours


def test_html_renders_with_empty_figures() -> None:
    # A run where everything failed still renders (charts say "no data").
    report = json.loads(json.dumps({
        "config": {"calls": 1, "scenario": "talk", "ramp_s": 0, "duration_s": 1, "target": None, "emulator_args": ""},
        "calls": {"attempted": 1, "connected": 0, "completed": 0, "failed": 1, "failed_by_reason": {"refused": 1}},
        "caller": {"ttfa_ms": {"p50": None, "p95": None, "p99": None, "count": 0},
                   "underruns": {"count": 0, "total_ms": 0, "method": "x"},
                   "jitter_ms": {"p50": None, "p99": None}, "barge_in_ms": {"p50": None, "p99": None, "count": 0}},
        "integrity": {"mismatches": 0, "method": "x"},
        "bridge_metrics": {k: {"p50": None, "p99": None, "count": 0, "buckets": []} for k in
                           ("forwarding_delay_ms", "text_to_first_frame_ms", "barge_in_latency_ms")},
        "bridge": {"cpu_percent": {"mean_steady": None, "max": None}, "rss_mb": {"start": None, "peak": None},
                   "per_call": {"cpu_percent": None, "rss_kb": None, "peak_active_calls": 0}},
        "loadtester": {"cpu_percent_mean": None, "cpu_percent_max": None},
        "timeseries": [], "per_call": [],
    }))
    html = render_html(report)
    assert html.count("<svg") == 7 and ("no data" in html or "no samples" in html)


# ---------------------------------------------------------------------- CLI


def test_cli_flags_and_target_mode(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--calls", "2", "--scenario", "nope"])
    # --target against a bridge that is not there: every call fails with a reason, report still written.
    rc = main(["--calls", "2", "--ramp-s", "0", "--duration-s", "1", "--target", "http://127.0.0.1:9",
               "--report", str(tmp_path), "--quiet", "--timeout-s", "20"])
    assert rc == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["calls"]["failed_by_reason"] == {"webhook_error": 2}
    assert report["integrity"]["checked"] is False and "frame-shape" in report["integrity"]["method"]
    assert report["bridge"]["measured"] is False
    assert (tmp_path / "report.html").exists()


def test_speaking_memory_is_taken_while_every_call_is_up_not_at_the_hang_up_peak() -> None:
    from bridge.loadtest.report import RunFacts, _bridge_section

    # 50 MB before calls; 60 MB with all 100 calls up; 70 MB while they hang up (memory not reused).
    samples = [{"active_calls": n, "bridge_rss_mb": mb, "bridge_cpu_percent": 10.0}
               for n, mb in [(0, 50.0), (50, 55.0), (100, 59.0), (100, 60.0), (60, 66.0), (10, 70.0)]]
    run = RunFacts(opts=Options(calls=100), results=[], samples=samples, metrics_text="", index=None,
                   bridge_pid=1, signed=True, started_wall=0.0, wall_s=1.0, timed_out=False,
                   rss_before_mb=50.0, emulator=None)
    per_call = _bridge_section(run)["per_call"]
    assert per_call["rss_kb"] == round(10 * 1024 / 100, 1)
    assert per_call["rss_kb_peak"] == round(20 * 1024 / 100, 1)
