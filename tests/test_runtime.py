import os
import threading
import time

import pytest
import torch

from memupdate.service.runtime import in_passing_thread


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def settles_at(count: int) -> bool:
    """The process is back to `count` threads within 5 s (helpers exit after their thread)."""
    deadline = time.monotonic() + 5
    while threads() != count and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads() == count


def parallel_work() -> float:
    a = torch.randn(512, 512)
    return float((a @ a).sum())


def test_torch_work_in_a_passing_thread_leaves_no_openmp_helpers_behind():
    """A thread that has run torch's parallel kernels keeps OpenMP helpers while it lives
    (what slows a training when other threads hold them); one that ends takes them along."""
    before = threads()
    done, stop = threading.Event(), threading.Event()

    def lives_on() -> None:
        parallel_work()
        done.set()
        stop.wait()

    alive = threading.Thread(target=lives_on)
    alive.start()
    done.wait()
    helpers = 1 if torch.get_num_threads() > 1 else 0  # one torch thread runs no helper
    assert threads() >= before + 1 + helpers
    stop.set()
    alive.join()
    assert settles_at(before)

    assert isinstance(in_passing_thread(parallel_work), float)
    assert settles_at(before)


def test_a_passing_thread_returns_the_result_and_raises_the_error():
    assert in_passing_thread(lambda x: (x, threading.current_thread().name), 3)[0] == 3
    assert in_passing_thread(lambda: threading.current_thread()) is not threading.current_thread()
    with pytest.raises(ValueError, match="bad"):
        in_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad")))
