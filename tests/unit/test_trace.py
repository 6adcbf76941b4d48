"""The job timeline (run.trace): per-process span files, their merge into one
Chrome trace, and the per-role accounting the async benchmark reads."""

from __future__ import annotations

import json
import time

import pytest

from asyncopd import trace


@pytest.fixture(autouse=True)
def _tracing_off_afterwards():
    yield
    trace.configure(None, "learner", 0)


def test_spans_of_several_processes_merge_into_one_chrome_trace(tmp_path) -> None:
    trace.configure(tmp_path, "actor", 0)
    with trace.span("generate", running=3):
        time.sleep(0.02)
    trace.configure(tmp_path, "learner", 0)
    with trace.span("train", step=0):
        time.sleep(0.03)
    merged = json.loads(trace.merge(tmp_path).read_text())
    spans = {e["name"]: e for e in merged["traceEvents"] if e["ph"] == "X"}
    assert set(spans) == {"generate", "train"}
    assert spans["generate"]["args"] == {"running": 3} and spans["generate"]["pid"] != spans["train"]["pid"]
    assert 15_000 < spans["generate"]["dur"] < 500_000  # microseconds
    names = {e["args"]["name"] for e in merged["traceEvents"] if e["name"] == "process_name"}
    assert names == {"actor 0", "learner 0"}


def test_a_span_is_recorded_when_its_block_raises(tmp_path) -> None:
    trace.configure(tmp_path, "teacher", 1)
    with pytest.raises(RuntimeError), trace.span("score"):
        raise RuntimeError("boom")
    assert list(trace.span_seconds(tmp_path)) == ["teacher 1"]


def test_disabled_tracing_writes_nothing(tmp_path) -> None:
    trace.configure(None, "actor", 0)
    with trace.span("generate"):
        pass
    assert not (tmp_path / "trace").exists() and trace.merge(tmp_path) is None


def test_span_seconds_clips_spans_to_the_window(tmp_path) -> None:
    (tmp_path / "trace").mkdir()
    lines = ['{"name":"process_name","ph":"M","pid":1000,"tid":0,"args":{"name":"actor 0"}},',
             '{"name":"generate","ph":"X","ts":1000000,"dur":2000000,"pid":1000,"tid":0},',  # 1 s .. 3 s
             '{"name":"admit","ph":"X","ts":4000000,"dur":500000,"pid":1000,"tid":0},']  # 4 s .. 4.5 s
    (tmp_path / "trace" / "actor-0.json").write_text("[\n" + "\n".join(lines) + "\n")
    assert trace.span_seconds(tmp_path) == {"actor 0": {"generate": 2.0, "admit": 0.5}}
    assert trace.span_seconds(tmp_path, 2.0, 4.25) == {"actor 0": {"generate": 1.0, "admit": 0.25}}
    fractions = trace.busy_fractions(tmp_path, skip_s=1.5)  # window 2.5 s .. 4.5 s
    assert fractions["actor 0"] == pytest.approx({"generate": 0.25, "admit": 0.25})


def test_a_file_cut_off_mid_line_by_a_crash_keeps_its_whole_lines(tmp_path) -> None:
    (tmp_path / "trace").mkdir()
    text = ('[\n{"name":"process_name","ph":"M","pid":0,"tid":0,"args":{"name":"learner 0"}},\n'
            '{"name":"train","ph":"X","ts":0,"dur":1000000,"pid":0,"tid":0},\n{"name":"tra')
    (tmp_path / "trace" / "learner-0.json").write_text(text)
    assert trace.span_seconds(tmp_path) == {"learner 0": {"train": 1.0}}
    assert len(json.loads(trace.merge(tmp_path).read_text())["traceEvents"]) == 2
