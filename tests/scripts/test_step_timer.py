"""benchmarks/train_worker.py's `StepTimer`: one duration and one token count per step, read after training."""

import sys
import time
from types import SimpleNamespace

from paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from train_worker import StepTimer  # noqa: E402


def test_each_step_gets_its_own_duration_and_tokens():
    counter = [0]
    timer = StepTimer(counter, profile_from=100, profile_dir=None)
    callback = timer.callback()
    for step, (tokens, pause) in enumerate([(8, 0.01), (5, 0.05), (7, 0.02)]):
        callback.on_step_begin(None, SimpleNamespace(global_step=step), None)
        counter[0] += tokens
        time.sleep(pause)
        callback.on_step_end(None, SimpleNamespace(global_step=step), None)
    times = timer.times()
    assert timer.tokens == [8, 5, 7]
    assert len(times) == 3 and times[1] > times[0] and times[1] > times[2] >= 0.02
