"""Start-up timings and the stall notice of ``vmscope run`` (vmscope.startup)."""

from __future__ import annotations

import logging
import time

from vmscope.startup import StartupClock, process_age


def test_a_stalled_start_says_where_it_is_and_where_each_thread_waits(tmp_path):
    out = tmp_path / "stderr"
    with open(out, "w") as stream:
        clock = StartupClock(notice_after=0.2, stream=stream)
        clock.enter("creating the machine (kvm)")
        time.sleep(1.0)  # a phase that hangs, as the lab's silent start did
        clock.done()
    text = out.read_text()
    assert "start-up is slow" in text and "now creating the machine (kvm)" in text, text
    assert "test_a_stalled_start_says_where_it_is" in text, "the notice must show where the main thread waits"


def test_a_prompt_start_prints_nothing_and_logs_each_phase(tmp_path, caplog):
    out = tmp_path / "stderr"
    caplog.set_level(logging.INFO, logger="vmscope.startup")
    with open(out, "w") as stream:
        clock = StartupClock(notice_after=0.5, stream=stream)
        clock.enter("importing")
        clock.enter("creating the machine")
        clock.done()
        clock.done()  # a second call (the early-return path) changes nothing
        time.sleep(0.8)
    assert out.read_text() == ""
    assert [name for name, _ in clock.timings] == ["importing", "creating the machine"]
    assert "start-up: creating the machine:" in caplog.text and caplog.text.count("ready after") == 1


def test_process_age_is_this_process():
    age = process_age()
    assert age is not None and 0 <= age < 3600
