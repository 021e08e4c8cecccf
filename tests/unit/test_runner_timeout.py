"""TrainRunner commands are bounded by train.command_timeout_s: a rank that never answers (a
hung collective) fails the command with a TimeoutError naming the command and the setting,
within the bound. No Ray Train: the runner's driver-side bookkeeping with a silent channel."""

import threading
import time

import pytest

from searche1_ray.config import Config
from searche1_ray.training.runner import TrainRunner


class _Silent:
    """A command channel whose ranks never answer."""
    def __init__(self):
        self.sent = []

        class M:
            def __init__(m, fn):
                m.remote = fn
        self.send = M(lambda cmd: self.sent.append(cmd))
        self.wait_results = M(lambda seq, t: time.sleep(0.05))   # None: not all ranks in yet


def _runner(timeout_s: float) -> TrainRunner:
    r = TrainRunner.__new__(TrainRunner)
    r.cfg = Config()
    r.cfg.train.command_timeout_s = timeout_s
    r.channel, r._seq, r._stopped, r._error = _Silent(), 0, False, None
    r._thread = threading.Thread(target=time.sleep, args=(30,), daemon=True)   # fit() still running
    r._thread.start()
    return r


@pytest.mark.faults("hung train collective (timeout)")
def test_a_command_no_rank_answers_times_out_naming_it(monkeypatch):
    monkeypatch.setattr("ray.get", lambda x: x)
    r = _runner(0.3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish 'save' within 0.3 s; a rank may hang in a "
                                           r"collective.*train.command_timeout_s"):
        r._command("save", path="x")
    assert time.monotonic() - t0 < 2.0
    assert r.channel.sent == [{"kind": "save", "seq": 1, "path": "x"}]


def test_an_explicit_timeout_wins_and_zero_config_means_none(monkeypatch):
    monkeypatch.setattr("ray.get", lambda x: x)
    r = _runner(0)                       # no configured limit ...
    with pytest.raises(TimeoutError, match="within 0.2 s"):
        r._command("weights", timeout=0.2)   # ... but the caller's own bound holds
