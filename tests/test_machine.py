"""bnq.machine.spread: work dealt over threads, each item on one thread, errors as one thread
would raise them."""

from __future__ import annotations

import threading
import time

import pytest

from bnq.machine import spread


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_every_item_runs_once_on_one_thread(threads):
    done = []

    def work(item):
        time.sleep(0.005)  # long enough for the pool's threads to take some
        done.append((item, threading.get_ident()))

    spread(work, list(range(20)), threads)
    assert sorted(item for item, _ in done) == list(range(20))
    used = {ident for _, ident in done}
    assert (used == {threading.get_ident()}) if threads == 1 else len(used) > 1
    spread(done.append, [], threads)  # nothing to do: nothing done


def test_the_first_failing_item_s_error_is_raised():
    def work(item):
        if item == 5:
            time.sleep(0.2)  # 12 fails first in time, on another thread; 5 comes first in order
        if item in (5, 12):
            raise ValueError(item)

    with pytest.raises(ValueError, match="^5$"):
        spread(work, list(range(20)), 3)


def test_it_returns_only_once_every_thread_is_done_even_on_ctrl_c():
    finished = threading.Event()

    def work(item):
        if threading.current_thread() is threading.main_thread():  # the caller's thread
            raise KeyboardInterrupt
        time.sleep(0.2)
        finished.set()

    with pytest.raises(KeyboardInterrupt):
        spread(work, [0, 1], 2)
    assert finished.is_set()
