"""Ctrl-C and SIGTERM stop a bench promptly: SIGTERM unwinds as a KeyboardInterrupt
(jobs._cli.interrupt_on_sigterm), and a TrainRunner stopped while that unwinds does not wait for
the current train command (it kills its channel) — before, ``bench.ablation`` needed SIGKILL
because ``stop`` waited up to 120 s for a GRPO step to finish. No Ray: the runner is a plain
object whose ``ray`` calls are recorded."""

import os
import signal
import threading
import time

import pytest

from jobs._cli import interrupt_on_sigterm
from searche1_ray.training import runner as runner_mod
from searche1_ray.training.runner import TrainRunner


class _Ray:
    def __init__(self):
        self.calls = []

    def get(self, x):
        self.calls.append(("get", x))

    def kill(self, actor):
        self.calls.append(("kill", actor))


class _Channel:
    class send:
        @staticmethod
        def remote(cmd):
            return ("send", cmd["kind"])


def _runner(tmp_path, monkeypatch, finishes: threading.Event):
    fake = _Ray()
    monkeypatch.setattr(runner_mod, "ray", fake)
    r = object.__new__(TrainRunner)
    r._stopped = False
    r.channel = _Channel()
    r.storage = tmp_path / "ray_train" / "grpo-x"
    r.storage.mkdir(parents=True)
    r._thread = threading.Thread(target=finishes.wait, daemon=True)  # a "step" that runs until set
    r._thread.start()
    return r, fake


def test_stop_waits_for_the_run_normally(tmp_path, monkeypatch):
    done = threading.Event()
    r, fake = _runner(tmp_path, monkeypatch, done)
    threading.Timer(0.3, done.set).start()
    r.stop(timeout_s=10)
    assert fake.calls[0] == ("get", ("send", "stop"))            # the loops were told to stop
    assert fake.calls[-1] == ("kill", r.channel)
    assert not r._thread.is_alive() and not r.storage.exists()   # fit returned; Train's copies deleted


def test_stop_aborts_while_ctrl_c_unwinds(tmp_path, monkeypatch):
    never = threading.Event()
    r, fake = _runner(tmp_path, monkeypatch, never)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        try:
            raise KeyboardInterrupt
        finally:
            r.stop(timeout_s=30)
    assert time.monotonic() - t0 < 2                             # did not wait for the step
    assert fake.calls == [("kill", r.channel)]                   # no stop command, channel killed
    assert r.storage.exists()                                    # fit may still write: left alone
    r.stop()                                                     # idempotent
    assert fake.calls == [("kill", r.channel)]
    never.set()


def test_sigterm_unwinds_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)
    try:
        interrupt_on_sigterm()
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)                                        # the handler runs in the main thread
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second one ends the process
    finally:
        signal.signal(signal.SIGTERM, before)
