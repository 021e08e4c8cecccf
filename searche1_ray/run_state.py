"""The run's schedule and its on-disk state (``runs/<name>/state.json``), written atomically.

The schedule is a flat list of stages computed from the config:
``eval/base`` → ``warmstart`` → ``eval/warmstart`` (both optional) → for each cycle c:
``grpo/c`` → ``eval/grpo<c>`` →
``opsd/c`` → ``eval/opsd<c>`` → ``report``. GRPO stages have steps; a step is recorded in
``done`` (``grpo/0/step3``) in the same atomic write that moves the policy pointer, so a
restarted driver repeats and skips nothing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from searche1_ray.durable import atomic_write


def schedule(cycles: int, warmstart: bool) -> list[str]:
    stages = ["eval/base"] + (["warmstart", "eval/warmstart"] if warmstart else [])
    for c in range(cycles):
        stages += [f"grpo/{c}", f"eval/grpo{c}", f"opsd/{c}", f"eval/opsd{c}"]
    return stages + ["report"]


@dataclass
class RunState:
    run: str
    stages: list[str]
    stage_index: int = 0
    step: int = 0                      # steps finished inside the current stage
    status: str = "created"            # created | running | stopped | failed | done
    policy: str = ""                   # folder of the current policy
    policy_version: int = 0
    round_start_policy: str = ""       # the policy a GRPO round started from: its KL reference
    done: list[str] = field(default_factory=list)      # every finished step / stage, once
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> {split: metrics}
    history: list[dict[str, Any]] = field(default_factory=list)     # one row per step
    timings: dict[str, float] = field(default_factory=dict)         # stage -> seconds
    # train-worker failures a GRPO or OPSD round survived: {stage, step it restarted from, error, time}
    faults: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    @property
    def stage(self) -> str | None:
        return self.stages[self.stage_index] if self.stage_index < len(self.stages) else None

    @property
    def finished(self) -> bool:
        return self.stage_index >= len(self.stages)

    def record_step(self, key: str, metrics: dict[str, Any], policy: str | None = None,
                    policy_version: int | None = None) -> None:
        if key in self.done:
            raise RuntimeError(f"run state: step {key} is already recorded")
        self.done.append(key)
        self.step += 1
        self.history.append({"key": key, "stage": self.stage, "step": self.step, "time": time.time(),
                             **metrics})
        if policy is not None:
            self.policy = policy
        if policy_version is not None:
            self.policy_version = policy_version

    def finish_stage(self, seconds: float, policy: str | None = None,
                     policy_version: int | None = None) -> None:
        stage = self.stage
        if stage is None:
            raise RuntimeError("run state: no stage left to finish")
        if stage in self.done:
            raise RuntimeError(f"run state: stage {stage} is already recorded")
        self.done.append(stage)
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        if policy is not None:
            self.policy = policy
        if policy_version is not None:
            self.policy_version = policy_version
        self.stage_index += 1
        self.step = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def state_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "state.json"


def save_state(run_dir: str | os.PathLike, state: RunState) -> None:
    """Write state.json atomically and durably (temp file in the same folder, fsync, rename,
    fsync the folder): once this returns, a crash leaves this state or a later one."""
    state.updated = time.time()
    atomic_write(state_path(run_dir), state.to_json())


def load_state(run_dir: str | os.PathLike) -> RunState:
    path = state_path(run_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"run: no state.json in {Path(run_dir)} — is this a run directory?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"run: {path} is not valid JSON ({e})") from None
    return RunState(**data)
