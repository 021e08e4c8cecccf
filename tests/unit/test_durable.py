"""Durable checkpoints and atomic writes: a save interrupted between write and rename (an error,
a full disk, a kill) leaves state.json pointing at a complete checkpoint; a partial ``.tmp``
folder is never reused; the previous checkpoint is pruned only after the new state is on disk."""

import errno
import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file

import searche1_ray.durable as durable
from actors.driver import SelfEvolutionDriver
from searche1_ray.config import load_config
from searche1_ray.durable import atomic_write, durable_folder
from searche1_ray.run_state import RunState, load_state, save_state
from searche1_ray.training.worker import save_hf_folder

Driver = SelfEvolutionDriver.__ray_metadata__.modified_class.__ray_actor_class__


class _Saves:
    """Stands in for an HF config / tokenizer: ``save_pretrained`` writes one JSON file."""

    def __init__(self, name):
        self.name = name

    def save_pretrained(self, folder):
        (folder / f"{self.name}.json").write_text(json.dumps({"name": self.name}))


def _save(folder, value, tmp_path):
    return save_hf_folder(folder, {"w": torch.full((4,), float(value))}, _Saves("config"), _Saves("tokenizer"),
                          tmp_path / "no-model")


def _complete(folder, value):
    return (sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
            and torch.equal(load_file(str(folder / "model.safetensors"))["w"], torch.full((4,), float(value))))


def _fail_on(monkeypatch, name, exc):
    """Make ``durable.<name>`` raise ``exc`` once when it touches a ``.tmp`` path."""
    real = getattr(durable, name)

    def failing(*args):
        if any(str(a).endswith(".tmp") for a in args):
            monkeypatch.setattr(durable, name, real)
            raise exc
        return real(*args)

    monkeypatch.setattr(durable, name, failing)


@pytest.mark.faults("checkpoint save interrupted (ENOSPC, killed between write and rename)")
@pytest.mark.parametrize("where, exc", [("replace_folder", OSError(errno.EIO, "rename failed")),
                                        ("fsync_path", OSError(errno.ENOSPC, "No space left on device"))])
def test_an_interrupted_checkpoint_leaves_state_pointing_at_a_complete_one(tmp_path, monkeypatch, where, exc):
    run = tmp_path / "run"
    a, b = run / "checkpoints" / "grpo0-step0001", run / "checkpoints" / "grpo0-step0002"
    st = RunState("r", ["grpo/0"])
    st.policy = str(_save(a, 1, tmp_path))
    save_state(run, st)
    _fail_on(monkeypatch, where, exc)
    with pytest.raises(OSError):
        _save(b, 2, tmp_path)  # the driver moves the pointer only after this returns
    assert load_state(run).policy == str(a) and _complete(a, 1)
    assert not b.exists() and not b.with_name(b.name + ".tmp").exists()
    _save(b, 2, tmp_path)  # the retry writes it whole
    assert _complete(b, 2)


@pytest.mark.faults("checkpoint save interrupted (ENOSPC, killed between write and rename)")
def test_a_stale_tmp_folder_is_deleted_not_reused(tmp_path):
    folder = tmp_path / "grpo0-step0003"
    stale = folder.with_name(folder.name + ".tmp")  # a kill between write and rename, or a full disk
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 10)  # truncated
    (stale / "optimizer.pt").write_bytes(b"left over")
    _save(folder, 3, tmp_path)
    assert _complete(folder, 3) and not stale.exists()


def test_a_checkpoint_over_an_old_one_replaces_it_whole(tmp_path):
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "old.bin").write_bytes(b"old")
    _save(folder, 5, tmp_path)
    assert _complete(folder, 5) and not list(tmp_path.glob(".policy.old*"))


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    atomic_write(path, "a: 1\n")
    monkeypatch.setattr(durable.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        atomic_write(path, "a: 2\n")
    assert path.read_text() == "a: 1\n" and os.listdir(tmp_path) == ["config.yaml"]  # no temp left


def test_writes_are_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(durable.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                         real_fsync(fd))[1])
    monkeypatch.setattr(durable.os, "replace", lambda s, d: (events.append(("replace", str(s))), real_replace(s, d))[1])
    save_state(tmp_path, RunState("r", ["report"]))
    tmp = next(p for kind, p in events if kind == "replace")
    assert events == [("fsync", tmp), ("replace", tmp), ("fsync", str(tmp_path))]
    events.clear()
    with durable_folder(tmp_path / "ck") as t:
        (t / "model.safetensors").write_bytes(b"x")
    assert events == [("fsync", str(t / "model.safetensors")), ("fsync", str(t)), ("replace", str(t)),
                      ("fsync", str(tmp_path))]


# --- the driver's GRPO round: the pointer moves only after a durable save, the prune after it ----

class _Runner:
    def __init__(self, tmp_path, fail_at=None):
        self.tmp_path, self.fail_at, self.saved, self.tasks = tmp_path, fail_at, [], []

    def save_checkpoint(self, folder):
        step = int(folder[-4:])
        if step == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.saved.append(step)
        return str(_save(__import__("pathlib").Path(folder), step, self.tmp_path))

    def stop(self):
        pass


class _Metrics:
    def __init__(self):
        self.steps = self

    def set(self, *a, **k):
        pass

    inc = scalars = set


def _grpo_driver(tmp_path, monkeypatch, runner):
    import searche1_ray.grpo_round as grpo_round
    import searche1_ray.training.runner as runner_mod
    import searche1_ray.training.tasks as tasks

    monkeypatch.setattr(runner_mod, "TrainRunner", lambda *a, **k: runner)
    monkeypatch.setattr(tasks, "GRPOTask", lambda cfg, **k: runner.tasks.append(k))
    monkeypatch.setattr(grpo_round, "grpo_step", lambda *a, **k: {"rollout/reward_mean": 0.5})
    d = object.__new__(Driver)
    d.cfg = load_config(None, ["grpo.steps_per_round=3", "grpo.checkpoint_every=1"])
    d.run_dir = tmp_path / "run"
    d.state = RunState("r", ["grpo/0"])
    d._stop, d._running, d._metrics, d._live = threading.Event(), threading.Lock(), _Metrics(), {}
    d.pool = d.tokenizer = None
    d._step_questions = lambda cycle, step: []
    return d


@pytest.mark.faults("full disk mid-round")
def test_a_full_disk_mid_round_leaves_the_last_durable_step(tmp_path, monkeypatch):
    d = _grpo_driver(tmp_path, monkeypatch, _Runner(tmp_path, fail_at=3))
    leftover = d.run_dir / "train" / "grpo0" / "ray_train" / "grpo-killed" / "grpo0-step0001"
    _save(leftover, 1, tmp_path)  # Ray Train's copy, left by a killed driver's runner
    pruned_while_state_named = []
    real_prune = Driver._prune
    monkeypatch.setattr(Driver, "_prune", lambda self, keep: (pruned_while_state_named.append(
        load_state(self.run_dir).policy), real_prune(self, keep))[1])
    with pytest.raises(OSError, match="No space left"):
        d._grpo_round(0)
    st = load_state(d.run_dir)
    ckpts = d.run_dir / "checkpoints"
    assert st.step == 2 and st.policy == str(ckpts / "grpo0-step0002") and _complete(ckpts / "grpo0-step0002", 2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["grpo0-step0002"]  # step 1 pruned, no partial step 3
    assert not (d.run_dir / "train" / "grpo0" / "ray_train").exists()
    # each prune ran only once state.json on disk named the checkpoint it keeps
    assert pruned_while_state_named == [str(ckpts / "grpo0-step0001"), str(ckpts / "grpo0-step0002")]


def test_a_round_resumed_mid_way_keeps_its_starting_policy_as_the_kl_reference(tmp_path, monkeypatch):
    first = _Runner(tmp_path, fail_at=3)
    d = _grpo_driver(tmp_path, monkeypatch, first)
    start = _save(tmp_path / "run" / "checkpoints" / "grpo0-step0000", 0, tmp_path)  # the round's start
    d.state.policy = str(start)
    with pytest.raises(OSError):
        d._grpo_round(0)
    assert first.tasks == [{"reference_path": None, "resume_from": None}]           # fresh: the model it trains
    st = load_state(d.run_dir)
    assert st.step == 2 and st.round_start_policy == str(start)
    ckpt2 = st.policy                                           # the trainer resumes from here
    assert _complete(start, 0)                                  # not pruned with the step checkpoints
    second = _Runner(tmp_path)
    d = _grpo_driver(tmp_path, monkeypatch, second)
    d.state = st                                                # the resume
    d._grpo_round(0)
    assert second.tasks == [{"reference_path": str(start), "resume_from": str(ckpt2)}] and second.saved == [3]


# --- Ray Train's copies of the checkpoints go when the round's runner stops ----------------

def test_the_runner_deletes_ray_trains_checkpoint_copies_when_fit_has_ended(tmp_path, monkeypatch):
    import types

    import searche1_ray.training.runner as runner_mod

    monkeypatch.setattr(runner_mod, "ray", types.SimpleNamespace(get=lambda x: x, kill=lambda actor: None))

    def runner(fit_ended):
        r = object.__new__(runner_mod.TrainRunner)
        r._stopped, r.channel = False, types.SimpleNamespace(send=types.SimpleNamespace(remote=lambda cmd: None))
        r._thread = threading.Thread(target=(lambda: None) if fit_ended else (lambda: release.wait(10)))
        r._thread.start()
        r.storage = tmp_path / "train" / "ray_train" / f"grpo-{fit_ended}"
        _save(r.storage / "grpo0-step0001", 1, tmp_path)  # Ray Train's copy of a checkpoint
        return r

    release = threading.Event()
    own = _save(tmp_path / "checkpoints" / "grpo0-step0001", 1, tmp_path)
    done = runner(fit_ended=True)
    done._thread.join()
    done.stop()
    assert not done.storage.exists() and _complete(own, 1)
    hung = runner(fit_ended=False)  # fit() still running: its folder is left alone
    hung.stop(timeout_s=0.1)
    assert _complete(hung.storage / "grpo0-step0001", 1)
    release.set()


def test_the_driver_reuses_an_opsd_validation_as_its_evaluation_atomically(tmp_path):
    d = object.__new__(Driver)
    d.cfg = load_config(None, ["eval.splits=[dev]", "eval.limit=2"])
    d.run_dir, d.state, d._live = tmp_path / "run", RunState("r", ["eval/opsd0"]), {}
    d._metrics = _Metrics()
    d._metrics.tb = type("TB", (), {"add_scalar": lambda *a: None})()
    d.questions = {"dev": [{"id": "q1"}, {"id": "q2"}]}
    validation = tmp_path / "opsd" / "eval" / "step0002.parquet"
    atomic_write(validation, "parquet bytes")
    d._known_evals = {("opsd0", "dev"): {"em": 0.5, "n": 2, "num_searches": 1.0, "path": str(validation)}}
    d._evaluate("opsd0")
    assert d.state.evals["opsd0"]["dev"] == {"em": 0.5, "n": 2, "num_searches": 1.0}
    out = d.run_dir / "eval" / "opsd0"
    assert os.listdir(out) == ["dev.parquet"] and (out / "dev.parquet").read_text() == "parquet bytes"
