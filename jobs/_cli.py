"""What the ``python -m jobs.*`` entrypoints share: the parser with --config / --set / --address,
config loading that exits cleanly on a bad value, logging, and connecting to Ray.

Nothing here imports Ray at module level: ``jobs.evaluate --dry-run`` must start (and import) nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from searche1_ray.config import Config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "smoke.yaml"

log = logging.getLogger("searche1.jobs")


def job_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser for ``python -m <prog>``: the docstring's first paragraph is the description, the
    rest (usage examples, what the job writes) the epilog, its line breaks kept."""
    description, _, epilog = doc.partition("\n\n")
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_config_args(parser: argparse.ArgumentParser, example: str | None = None) -> None:
    """--config (default configs/smoke.yaml) and repeatable --set KEY=VALUE (into ``args.overrides``)."""
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/smoke.yaml)")
    hint = f", e.g. --set {example}" if example else ""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value{hint} (repeatable)")


def add_address_arg(parser: argparse.ArgumentParser) -> None:
    """--address of a Ray cluster; see ``ray_address`` for the fallbacks."""
    parser.add_argument("--address",
                        help="Ray cluster address (default: RAY_ADDRESS / run.ray_address, else a private local Ray)")


@contextmanager
def config_errors() -> Iterator[None]:
    """Turn a ConfigError (its message names the key) into that message on stderr and exit status 2."""
    from searche1_ray.config import ConfigError

    try:
        yield
    except ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None


def load_cli_config(args: argparse.Namespace, extra_overrides: Sequence[str] = ()) -> Config:
    """The config of ``args.config`` with ``args.overrides`` then ``extra_overrides`` applied;
    a bad value exits with status 2 and a message naming the key (``config_errors``)."""
    from searche1_ray.config import load_config

    with config_errors():
        return load_config(args.config, [*args.overrides, *extra_overrides])


def setup_logging(show_logger: bool = False) -> None:
    """INFO logs to stderr with a HH:MM:SS timestamp, and the logger's name when ``show_logger``."""
    fmt = "%(asctime)s %(name)s: %(message)s" if show_logger else "%(asctime)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S")


def ray_address(cfg: Config, address: str | None) -> str:
    """The cluster to attach to: --address, else RAY_ADDRESS, else run.ray_address; "" = a private local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or cfg.run.ray_address


def init_ray(cfg: Config, address: str | None) -> str:
    """Attach to the cluster (``ray_address``) or start a private local Ray with run.num_cpus logical
    CPUs (0 = 4 x the cores) whose workers import this repo (PYTHONPATH runtime env).
    Returns the address attached to, "" for the local Ray."""
    import ray

    address = ray_address(cfg, address)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "TOKENIZERS_PARALLELISM": "false"}
    if address:
        ray.init(address=address, namespace="searche1", log_to_driver=False)
        log.info("attached to the Ray cluster at %s", address)
    else:
        num_cpus = cfg.run.num_cpus or (os.cpu_count() or 2) * 4
        ctx = ray.init(address="local", num_cpus=num_cpus, namespace="searche1",
                       include_dashboard=cfg.run.dashboard, dashboard_host="127.0.0.1",
                       dashboard_port=cfg.run.dashboard_port or None,
                       runtime_env={"env_vars": env}, log_to_driver=False)
        log.info("started a local Ray with %s logical CPUs", num_cpus)
        url = getattr(ctx, "dashboard_url", "") if cfg.run.dashboard else ""
        if url:
            print(f"Ray dashboard: http://{url}", flush=True)
            if os.environ.get("RAY_AUTH_MODE", "token") != "disabled":
                log.info("the dashboard asks for Ray's auth token: the contents of ~/.ray/auth_token "
                         "(RAY_AUTH_MODE=disabled turns token auth off)")
    return address


def init_ray_unless_running(cfg: Config, address: str | None) -> bool:
    """``init_ray`` unless Ray is already initialised in this process (a test, a notebook);
    returns whether it was started here (and so is ours to shut down)."""
    import ray

    if ray.is_initialized():
        return False
    init_ray(cfg, address)
    return True


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (``kill <pid>``, a scheduler's stop) unwind like Ctrl-C: a KeyboardInterrupt
    in the main thread, so ``finally`` blocks stop the train run without waiting for its step
    (TrainRunner.stop aborts while an interrupt unwinds), kill the engines and shut Ray down."""
    import signal

    def on_term(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)


def shutdown_ray(serve: bool = True) -> None:
    """Shut Serve down (when ``serve``), then Ray, even if Serve's shutdown fails."""
    import ray

    try:
        if serve:
            from ray import serve as ray_serve

            ray_serve.shutdown()
    finally:
        ray.shutdown()


def _count(path: str | None) -> str:
    if not path:
        return "not set"
    p = Path(path).expanduser()
    if not p.is_file():
        return f"{p}  (not on this machine)"
    from searche1_ray.data.readers import read_qa

    return f"{p}  ({len(read_qa(p)):,} questions)"


def run_plan_lines(cfg) -> list[str]:
    """What a run of ``cfg`` reads and spends, for ``--dry-run``: the data splits (with the
    validation set OPSD selects on) and the rollout / training budget of each cycle."""
    from searche1_ray.grpo import updates_per_step

    d, g, o = cfg.data, cfg.grpo, cfg.opsd
    lines = []
    if d.source == "synthetic":
        lines.append(f"data        synthetic world (seed {d.world.seed}, {d.world.num_questions:,} questions "
                     "in train / dev / test splits of its own)")
    else:
        lines += [f"train       {_count(d.train_path)}", f"test        {_count(d.test_path)}"]
    if d.dev_from_train:
        lines.append(f"validation  {d.dev_from_train:,} questions held out of the training file "
                     f"(data.dev_seed={d.dev_seed}); never the test sets")
    elif d.source == "files":
        lines.append("validation  " + (_count(d.dev_path) if d.dev_path else
                                       "none: OPSD merges its last step unvalidated (set data.dev_from_train)"))
    else:
        lines.append("validation  the world's dev split")
    n_dev = d.max_eval_questions or d.dev_from_train
    on_dev = (f"the first {cfg.eval.limit:,} questions of each data source (eval.limit)" if cfg.eval.limit
              else f"{n_dev:,} questions" if n_dev else "the whole validation set")
    seqs = g.questions_per_step * cfg.rollout.group_size
    updates = updates_per_step(seqs, g.mini_batch_size, g.ppo_epochs)
    lines.append(f"per cycle   ({cfg.run.cycles} cycles)")
    lines.append(f"  GRPO      {g.steps_per_round} steps x {g.questions_per_step} questions x G="
                 f"{cfg.rollout.group_size} = {g.steps_per_round * seqs:,} rollouts; {seqs:,} sequences per "
                 f"step in {updates} optimizer update(s) (mini-batch {g.mini_batch_size or seqs}, "
                 f"{g.ppo_epochs} epoch(s)), lr {g.lr:g}")
    pool = (f"{o.questions_per_round:,} training questions x K={o.samples_per_question} = "
            f"{o.questions_per_round * o.samples_per_question:,} rollouts" if o.questions_per_round
            else f"every training question x K={o.samples_per_question}")
    lines.append(f"  OPSD      {pool} -> pairs; {o.steps} LoRA steps x {o.batch_size} pairs = "
                 f"{o.steps * o.batch_size:,} pair uses; validation every {o.eval_every} steps on "
                 + on_dev)
    return lines
