"""Print a run's status: from its live driver when one is running, else from runs/<name>/state.json.

    python -m jobs.status smoke
    python -m jobs.status runs/smoke --address auto
    python -m jobs.status smoke --scale-rollout 2     # resize the live rollout pool
    python -m jobs.status smoke --address auto --stop # ask the live driver to finish its step and stop
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run name (under runs/, or ~/searche1-ray/runs/ for a run a Ray job wrote) or run folder")
    p.add_argument("--address", default="", help="Ray address of a live run (e.g. auto); default: read state.json")
    p.add_argument("--scale-rollout", type=int, metavar="N", help="set the live run's rollout workers to N")
    p.add_argument("--stop", action="store_true",
                   help="ask the live run's driver to finish its current step, save and stop "
                        "(resumable with `python -m jobs.train --resume RUN`)")
    p.add_argument("--json", action="store_true", help="print raw JSON")
    args = p.parse_args(argv)

    status = None
    if args.address:
        import ray

        from actors.driver import NAMESPACE, driver_name

        ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False)
        try:
            driver = ray.get_actor(driver_name(Path(args.run).name), namespace=NAMESPACE)
        except ValueError:
            print(f"status: no live driver for run '{args.run}' on {args.address}", file=sys.stderr)
            return 1
        if args.scale_rollout is not None:
            print(f"rollout workers: {ray.get(driver.scale_rollout.remote(args.scale_rollout))}")
        if args.stop:
            ray.get(driver.request_stop.remote())
            print(f"asked run '{args.run}' to stop after its current step")
        status = ray.get(driver.status.remote())
    elif args.scale_rollout is not None or args.stop:
        print("status: --scale-rollout and --stop need --address of the live run", file=sys.stderr)
        return 2
    else:
        from searche1_ray.config import RunConfig
        from searche1_ray.run_folder import find_run_dir
        from searche1_ray.run_state import load_state

        try:
            st = load_state(find_run_dir(args.run, RunConfig().output_dir, "state.json"))
        except (FileNotFoundError, ValueError) as e:
            print(f"status: {e}", file=sys.stderr)
            return 1
        status = {"run": st.run, "status": st.status, "stage": st.stage, "step": st.step,
                  "stage_index": st.stage_index, "num_stages": len(st.stages),
                  "policy_version": st.policy_version, "evals": st.evals, "timings": st.timings,
                  "last": st.history[-1] if st.history else {}, "error": st.error.splitlines()[:1],
                  "faults": st.faults}
    if args.json:
        print(json.dumps(status, indent=1, default=str))
        return 0
    print(f"run {status['run']}: {status['status']} — stage {status['stage'] or 'finished'} "
          f"({status['stage_index']}/{status['num_stages']}), step {status['step']}, "
          f"policy v{status['policy_version']}")
    for label, r in status.get("evals", {}).items():
        print(f"  EM {label}: " + ", ".join(f"{k} {v['em']:.3f}" for k, v in r.items()))
    last = {k: v for k, v in (status.get("last") or {}).items() if isinstance(v, (int, float)) and "/" in k}
    if last:
        print("  last step: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(last.items())))
    faults = status.get("faults") or []
    if faults:
        f = faults[-1]
        print(f"  train-worker failures survived: {len(faults)} (last in {f.get('stage')}, restarted "
              f"from step {f.get('restart_step')}: {f.get('error')})")
    if status.get("error"):
        print(f"  error: {status['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
