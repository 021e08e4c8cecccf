"""GPU check: the paper recipe's rehearsal cycle on the GPU code paths, one pass/fail line per part.

    python -m jobs.gpu_check --model /models/Qwen2.5-3B-Instruct            # every local GPU
    python -m jobs.gpu_check --model /models/Qwen2.5-3B-Instruct --gpus 1   # one GPU, shared
    python -m jobs.gpu_check --model /models/Qwen2.5-3B-Instruct --dry-run  # the plan; starts nothing

For a machine with CUDA GPUs and the packages of requirements-gpu.txt installed (vllm, faiss-gpu,
deepspeed); the model is a local HF folder (nothing is downloaded). It writes a tiny synthetic
world in the published Search-R1 / FlashRAG / wiki-18 layout and runs
``configs/paper_qwen2.5_3b.yaml`` through one cycle with only the overrides of
searche1_ray/rehearsal.py (the CPU dress rehearsal's sizes, GPU placement): GRPO (vLLM on CUDA,
ZeRO-3 in bf16, the faiss-gpu retriever) → OPSD with validation → LoRA merge → seven-dataset
evaluation. With two or more GPUs it then checks the NCCL weight broadcast from a train rank to
a vLLM engine on another GPU (NCCL refuses two ranks on one device, so one GPU skips that part).

Parts, one line each (``PASS`` / ``FAIL`` / ``SKIP`` and why): env, rollout (vLLM CUDA), retriever
(faiss-gpu), train (ZeRO-3 bf16), opsd (validation + merge), eval (seven datasets), nccl sync.
The last line: ``gpu_check=pass|fail parts=<n> failed=<n> seconds=<s>``. Exit status 0 when
nothing failed. On the hardware it was written for (one 80 GB GPU, a 3B model) the cycle is meant
to take under 10 minutes; ``--timeout-min`` bounds it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs._cli import job_parser

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper_qwen2.5_3b.yaml"
PARTS = ("env", "rollout (vLLM CUDA)", "retriever (faiss-gpu)", "train (ZeRO-3 bf16)",
         "opsd (validation + merge)", "eval (seven datasets)", "nccl sync")


class CheckError(Exception):
    """Bad arguments or a machine the check cannot run on: the message says which."""


def parse_args(argv=None):
    p = job_parser("jobs.gpu_check", __doc__)
    p.add_argument("--model", required=True, help="a local HF model folder (with config.json)")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs to use (default: every visible one; 1 = engine, train rank and retriever share it)")
    p.add_argument("--out", help="work folder (default: a new temporary folder, deleted after a pass)")
    p.add_argument("--timeout-min", type=float, default=20.0, help="bound on the cycle (default 20)")
    p.add_argument("--dry-run", action="store_true", help="print the parts, the overrides and the Ray plan; start nothing")
    return p.parse_args(argv)


def check_args(args, visible_gpus: int) -> int:
    """The number of GPUs to use, or CheckError naming the argument."""
    model = Path(args.model).expanduser()
    if not model.is_dir():
        raise CheckError(f"gpu_check: --model {args.model}: no such folder (give a local HF model folder)")
    if not (model / "config.json").is_file():
        raise CheckError(f"gpu_check: --model {args.model}: no config.json in it (not an HF model folder)")
    if args.timeout_min <= 0:
        raise CheckError(f"gpu_check: --timeout-min must be > 0, got {args.timeout_min:g}")
    gpus = visible_gpus if args.gpus is None else args.gpus
    if args.gpus is not None and args.gpus < 1:
        raise CheckError(f"gpu_check: --gpus must be >= 1, got {args.gpus}")
    if args.dry_run:
        return max(gpus, 1)
    if visible_gpus == 0:
        raise CheckError("gpu_check: no CUDA GPU is visible here (torch.cuda.device_count() == 0); run it on "
                         "a GPU machine (--dry-run prints its plan anywhere)")
    if gpus > visible_gpus:
        raise CheckError(f"gpu_check: --gpus {gpus} but only {visible_gpus} CUDA GPU(s) are visible")
    return gpus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides_for(model: str, out: Path, gpus: int, port: int | None = None) -> list[str]:
    from searche1_ray.rehearsal import rehearsal_overrides

    return rehearsal_overrides(out / "published", model, out, port or _free_port(), gpus=gpus)


def _visible_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:
        return 0


def env_part(gpus: int) -> tuple[bool, str]:
    """What the GPU code paths import and find."""
    facts, problems = [], []
    try:
        import torch
        facts.append(f"torch {torch.__version__} CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")
        if not torch.cuda.is_bf16_supported():
            problems.append("no bf16 on this GPU")
        if not torch.distributed.is_nccl_available():
            problems.append("torch has no NCCL")
    except Exception as e:
        problems.append(f"torch: {e}")
    for mod, check in (("vllm", None), ("deepspeed", None), ("faiss", "get_num_gpus")):
        try:
            m = __import__(mod)
            facts.append(f"{mod} {getattr(m, '__version__', '?')}")
            if check and getattr(m, check, lambda: 0)() < 1:
                problems.append(f"{mod} sees no GPU (faiss-cpu installed instead of faiss-gpu?)")
        except Exception as e:
            problems.append(f"{mod}: {type(e).__name__}: {e}")
    return not problems, "; ".join(facts + problems)


def judge_run(run_dir: Path, gpus: int) -> dict[str, tuple[bool, str]]:
    """Per part, (passed, what showed it) from a finished rehearsal run's state.json and config."""
    try:
        state = json.loads((run_dir / "state.json").read_text())
        cfg = (run_dir / "config.yaml").read_text()
    except (OSError, ValueError) as e:
        return {p: (False, f"no run state: {e}") for p in PARTS[1:6]}
    hist = state.get("history", [])
    grpo = [h for h in hist if str(h.get("stage", "")).startswith("grpo")]
    opsd = [h for h in hist if str(h.get("stage", "")).startswith("opsd")]
    err = (state.get("error") or "").splitlines()[:1]
    why = f"run {state.get('status')}" + (f": {err[0]}" if err else "")
    res = {}
    res["rollout (vLLM CUDA)"] = (bool(grpo) and "rollout/reward_mean" in grpo[0],
                                  f"reward {grpo[0].get('rollout/reward_mean'):.3f}" if grpo and "rollout/reward_mean" in grpo[0] else why)
    res["retriever (faiss-gpu)"] = ("faiss_gpu: true" in cfg and bool(grpo),
                                    "searched through the faiss-gpu app" if grpo else why)
    loss = grpo[0].get("grpo/loss") if grpo else None
    res["train (ZeRO-3 bf16)"] = ("zero_stage: 3" in cfg and "bf16: true" in cfg and loss is not None
                                  and math.isfinite(loss), f"GRPO loss {loss}" if loss is not None else why)
    evals = opsd[0].get("opsd/evals", []) if opsd else []
    res["opsd (validation + merge)"] = (len(evals) >= 2, f"validated at steps {[e['step'] for e in evals]}" if evals else why)
    final = (state.get("evals") or {})
    last = final[list(final)[-1]].get("test", {}) if final else {}
    n_sets = len(last.get("by_type", {}))
    res["eval (seven datasets)"] = (state.get("status") == "done" and n_sets == 7,
                                    f"{n_sets} datasets, Avg. {last.get('avg', float('nan')):.3f}" if last else why)
    return res


def nccl_part(model: str, out: Path, gpus: int) -> tuple[bool | None, str]:
    """A train rank on one GPU broadcasts its weights over NCCL into a vLLM engine on another:
    the engine, first loaded with perturbed weights, must decode greedily as from the model again."""
    if gpus < 2:
        return None, "needs 2 GPUs (NCCL refuses two ranks on one device)"
    import ray
    import torch
    from safetensors.torch import load_file

    from actors.rollout_worker import RolloutPool
    from searche1_ray.config import load_config
    from searche1_ray.training.runner import TrainRunner
    from searche1_ray.training.tasks import GRPOTask

    cfg = load_config(PAPER, overrides_for(model, out, gpus) + ["train.num_workers=1", "rollout.num_gpus_per_worker=1",
                                                                 "retriever.num_gpus=0"])
    ray.init(num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    pool = runner = None
    try:
        q = [{"id": "q0", "question": "What is the capital of France?", "golden_answers": ["Paris"]}]
        pool = RolloutPool(cfg, model, lambda qs, k: [[] for _ in qs])
        runner = TrainRunner(cfg, model, GRPOTask(cfg), str(out / "nccl"))

        def greedy():
            return [r["response_ids"] for r in pool.generate(q, n=1, temperature=0.0, max_response_tokens=24)]

        want = greedy()
        g = torch.Generator().manual_seed(0)
        sd = {}
        for f in sorted(Path(model).glob("*.safetensors")):
            sd.update(load_file(str(f)))
        pool.update_weights({k: v + 0.05 * torch.randn(v.shape, generator=g).to(v.dtype) if v.dim() == 2 else v
                             for k, v in sd.items()}, 1)
        if greedy() == want:
            return False, "perturbed weights decoded as the model did: the check cannot tell a transfer"
        seconds = runner.broadcast_weights(pool, 2, backend="nccl")
        got = greedy()
        return got == want, f"broadcast in {seconds:.1f} s; greedy output {'restored' if got == want else 'differs'}"
    finally:
        if runner is not None:
            runner.stop()
        if pool is not None:
            pool.shutdown()
        ray.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        gpus = check_args(args, 0 if args.dry_run else _visible_gpus())
    except CheckError as e:
        print(e, file=sys.stderr)
        return 2
    model = str(Path(args.model).expanduser().resolve())
    if args.dry_run:
        out = Path(args.out).expanduser().resolve() if args.out else Path(tempfile.gettempdir()) / "gpu_check-XXXX"
    else:
        out = Path(args.out).expanduser().resolve() if args.out else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    if args.dry_run:
        from searche1_ray.config import load_config
        from searche1_ray.plan import format_plan, resource_plan

        ov = overrides_for(model, out, gpus, port=8000)
        print(f"gpu_check plan on {gpus} GPU(s): {', '.join(PARTS)}")
        print(f"config {PAPER.relative_to(ROOT)} with these overrides (searche1_ray/rehearsal.py):")
        for o in ov:
            print(f"  --set {o}")
        print(format_plan(resource_plan(load_config(PAPER, ov))))
        print("nothing was started (--dry-run)")
        return 0

    t0 = time.time()
    results: dict[str, tuple[bool | None, str]] = {"env": env_part(gpus)}
    from searche1_ray.data.published_layout import write_published_layout
    from searche1_ray.data.world import generate_world

    write_published_layout(generate_world(seed=0, num_questions=60), out / "published")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "jobs.train", "--config", str(PAPER), "--quiet", "--overwrite",
           *[f"--set={o}" for o in overrides_for(model, out, gpus)]]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout_min * 60)
        tail = (p.stdout + p.stderr)[-3000:]
        (out / "cycle.log").write_text(p.stdout + p.stderr)
    except subprocess.TimeoutExpired:
        tail = f"the cycle did not finish within --timeout-min {args.timeout_min:g}"
    results.update(judge_run(out / "rehearsal", gpus))
    try:
        results["nccl sync"] = nccl_part(model, out, gpus)
    except Exception as e:
        results["nccl sync"] = (False, f"{type(e).__name__}: {e}")
    failed = [k for k, (ok, _) in results.items() if ok is False]
    for part in PARTS:
        ok, why = results[part]
        print(f"{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}  {part}: {why}")
    if failed:
        print(f"cycle log: {out / 'cycle.log'}\n{tail}", file=sys.stderr)
    print(f"gpu_check={'fail' if failed else 'pass'} parts={len(PARTS)} failed={len(failed)} "
          f"seconds={time.time() - t0:.0f}")
    if not failed and not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
