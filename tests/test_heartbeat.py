"""The heartbeat that turns a frozen rank into a fast, named failure (yolods.faults.PeerPulse), and the stop request
the watchdog raises when the launcher is gone, and the watch on a rank's own checkpoint writes (WriteWatch).

Two pulses share a real TCPStore in this process, one per rank, with a timeout of a fraction of a second; the
2-rank jobs in test_faults.py freeze a real rank with SIGSTOP.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch.distributed as torch_dist

from yolods.faults import PeerPulse, WriteWatch
from yolods.preemption import STOP_SIGNALS, StopRequest

TIMEOUT_S = 0.6  # the watcher restarts the timeout after a 0.3 s gap in its own polling: ticks stay far below
TICK_S = 0.05


@pytest.fixture
def pulses():
    store = torch_dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, wait_for_workers=False)
    return [PeerPulse(store, rank=rank, world_size=2, timeout_s=TIMEOUT_S) for rank in (0, 1)]


def beat_for(seconds: float, *pulses: PeerPulse, progress: tuple[int, ...] = (0, 0)) -> list[tuple[float, str | None]]:
    """Call beat_and_check on each pulse every TICK_S for `seconds`: (seconds since the start, the first pulse's
    failure phrase or None) for each call."""
    answers = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        failure = pulses[0].beat_and_check(progress[0])
        answers.append((time.monotonic() - started, failure.phrase if failure else None))
        for pulse, count in zip(pulses[1:], progress[1:]):
            pulse.beat_and_check(count)
        time.sleep(TICK_S)
    return answers


def first_report(answers: list[tuple[float, str | None]]) -> tuple[float, str]:
    reports = [(at, phrase) for at, phrase in answers if phrase is not None]
    assert reports, "nothing was reported"
    return reports[0]


def quiet(answers: list[tuple[float, str | None]]) -> bool:
    return all(phrase is None for _, phrase in answers)


def test_a_peer_that_beats_is_never_reported_and_one_that_falls_silent_is_named(pulses):
    watcher, peer = pulses
    assert quiet(beat_for(1.2 * TIMEOUT_S, watcher, peer))
    at, phrase = first_report(beat_for(1.6 * TIMEOUT_S, watcher))  # the peer froze
    assert phrase.startswith("rank 1 stopped responding: no heartbeat for"), phrase
    assert at >= TIMEOUT_S - 2 * TICK_S, at  # not before the timeout (its last beat was up to a tick earlier)
    watcher.kill_silent_peer()  # a peer in this very process is never killed: this test goes on


def test_a_peer_that_finished_or_never_started_is_not_reported(pulses):
    watcher, peer = pulses
    assert quiet(beat_for(1.2 * TIMEOUT_S, watcher))  # the peer is still starting: it has not beaten yet
    beat_for(TIMEOUT_S / 2, watcher, peer)
    peer.finish()  # a clean exit: its silence from now on is no fault
    assert quiet(beat_for(1.2 * TIMEOUT_S, watcher))


def test_a_gap_in_the_watchers_own_polling_gives_the_peer_a_fresh_timeout(pulses):
    """A Ctrl-Z of the whole job, or a host paused: the watcher cannot tell the peer's silence from its own."""
    watcher, peer = pulses
    beat_for(TIMEOUT_S / 2, watcher, peer)
    time.sleep(1.5 * TIMEOUT_S)  # nobody polled, nobody beat
    assert watcher.beat_and_check(0) is None
    at, _ = first_report(beat_for(1.2 * TIMEOUT_S, watcher))  # a peer that stays silent after the gap is reported
    assert at >= TIMEOUT_S - 2 * TICK_S, at  # but only a whole timeout after it


def test_a_peer_whose_progress_stays_behind_is_reported_as_stuck_and_one_merely_slower_is_not(pulses):
    """Its watchdog thread beats on, but its main thread has stopped counting the phases of its train steps."""
    watcher, peer = pulses
    # equal counts (validation, a checkpoint, a barrier): no one is behind, however long it lasts
    assert quiet(beat_for(1.8 * TIMEOUT_S, watcher, peer, progress=(5, 5)))
    # behind but counting: a slower rank
    slower = []
    for count in range(5, 5 + int(1.8 * TIMEOUT_S / TICK_S)):
        slower += beat_for(TICK_S, watcher, peer, progress=(count + 2, count))
    assert quiet(slower)
    at, phrase = first_report(beat_for(2 * TIMEOUT_S, watcher, peer, progress=(50, 40)))
    assert phrase.startswith("rank 1 is stuck: its training step or validation made no progress for"), phrase
    assert at >= 1.5 * TIMEOUT_S - 2 * TICK_S, at  # 1.5 x the heartbeat's timeout


@pytest.fixture
def stop_request():
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield StopRequest().install()
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_a_signal_that_arrives_after_the_watchdogs_guess_names_the_stop(stop_request):
    """A group SIGTERM reaches the launcher and the ranks together; the watchdog may see the launcher gone before
    Python runs the rank's handler, and the closing message must still name the signal."""
    stop_request.request(signal.SIGTERM, cause="the launcher's exit")
    os.kill(os.getpid(), signal.SIGINT)
    assert (stop_request.received, stop_request.cause) == (signal.SIGINT, "SIGINT")
    os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not rename a stop already named by one
    assert (stop_request.received, stop_request.cause) == (signal.SIGINT, "SIGINT")


def test_the_watchdogs_guess_does_not_rename_a_stop_a_signal_asked_for(stop_request):
    os.kill(os.getpid(), signal.SIGTERM)
    stop_request.request(signal.SIGTERM, cause="the launcher's exit")
    assert stop_request.cause == "SIGTERM"


class FakeDisk:
    """A byte counter the test moves, as /proc/self/io's wchar moves while a write goes through."""

    def __init__(self):
        self.written = 0

    def __call__(self) -> int:
        return self.written


def test_a_write_that_moves_no_bytes_is_reported_and_a_slow_one_is_not():
    disk = FakeDisk()
    watch = WriteWatch(timeout_s=0.3, bytes_written=disk)
    assert watch.stalled_s() is None  # no write open: a rank waiting in a barrier moves no bytes either
    with watch.writing():
        for _ in range(10):  # 0.5 s of a slow write that keeps moving: longer than the timeout, never reported
            disk.written += 1
            time.sleep(0.05)
            assert watch.stalled_s() is None
        reports = []
        for _ in range(8):  # then nothing moves for 0.4 s, the watcher looking as the watchdog does
            time.sleep(0.05)
            reports.append(watch.stalled_s())
        assert reports[0] is None and reports[-1] >= 0.3
    assert watch.stalled_s() is None  # the write returned


def test_a_write_is_never_judged_where_the_byte_counter_is_unknown():
    watch = WriteWatch(timeout_s=0.0, bytes_written=lambda: None)
    with watch.writing():
        time.sleep(0.01)
        assert watch.stalled_s() is None


def test_this_process_has_a_byte_counter_that_a_file_write_moves(tmp_path):
    from yolods.faults import _bytes_written

    before = _bytes_written()
    (tmp_path / "file").write_bytes(b"x" * 4096)
    assert _bytes_written() >= before + 4096


def test_a_pause_of_the_whole_process_gives_the_write_a_fresh_timeout():
    """A Ctrl-Z of the job (or a paused host) stops the write and its watcher alike: that is no hang."""
    watch = WriteWatch(timeout_s=0.3, bytes_written=FakeDisk())
    with watch.writing():
        time.sleep(0.4)  # the watcher did not look: paused with the rest of the process
        assert watch.stalled_s() is None
        time.sleep(0.1)
        assert watch.stalled_s() is None
