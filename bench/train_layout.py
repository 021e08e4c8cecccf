"""Train-step time by worker layout: the same warm-start batches on N gloo ranks x T threads.

    python -m bench.train_layout                          # 2x1 (the smoke config) vs 1x2
    python -m bench.train_layout --layouts 2x1:2 1x2:4 1x2:8 --batch 8 --steps 4

A layout is ``RANKSxTHREADS[:MICRO]``: ``train.num_workers`` Ray Train ranks (DeepSpeed ZeRO-2 over
gloo), ``train.cpus_per_worker`` torch threads each, ``train.micro_batch_size`` MICRO (default:
the config's). Every layout trains the same fresh SmolLM2 on the same ``--batch``-sized batches of
oracle warm-start trajectories (SFT, the warm start's loss) for ``--steps`` steps; the first step
is a warm-up and is left out of the median. One layout at a time, each on the whole machine.

Prints seconds per step, sequence tokens per second and MFU per layout; the last line is
``<fastest>_vs_<first>=<ratio of median step times>``.

MFU = model FLOPs per second ÷ the matmul peak measured in the same run (``matmul_peak``: a
square matmul of the trainer's dtype — bf16 where train.bf16 resolves to it, else fp32 — on
every core, best of 5). Model FLOPs per sequence token: 6·N (forward + backward over the N
parameters) + 12·L·d·s (attention scores and values, forward + backward, at the batch's mean
sequence length s; causal masking not discounted), as in the PaLM paper's appendix B.

Measured 2026-12-08 (an AVX512-BF16 EPYC, 2 cores; bf16; --batch 8 --steps 3, 5,495 sequence
tokens a batch, mean length 687): matmul peak 407 GFLOP/s bf16. A separate 2048^3 check run
beside the first layout for ~10 s read bf16 330 and fp32 135 GFLOP/s: bf16 is ~2.4x fp32 here.

    2x1:1  step 27.8 s (38.7 31.8 23.7)  189 sequence tok/s  MFU 44.2 %   (the bench.ablation layout)
    1x2:1  step 35.6 s (40.9 38.8 32.3)  146 sequence tok/s  MFU 34.1 %

Two gloo ranks of one thread beat one rank of two threads by 1.3x here, ZeRO-2's per-backward
gradient reduction included; issue 18's 35 % MFU target is met by the smoke layout on this kind
of machine (the issue's ~18 % was read against the 772 GFLOP/s bf16 peak of a faster kind).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("searche1.bench.train_layout")


def parse_layout(text: str) -> tuple[int, int, int | None]:
    try:
        shape, _, micro = text.partition(":")
        ranks, threads = (int(x) for x in shape.lower().split("x"))
        mb = int(micro) if micro else None
        if ranks < 1 or threads < 1 or (mb is not None and mb < 1):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"layout {text!r}: expected RANKSxTHREADS[:MICRO], e.g. 2x1 or 1x2:4")
    return ranks, threads, mb


def matmul_peak(dtype, threads: int, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` n×n @ n×n matmuls in ``dtype`` on ``threads`` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return 2 * n ** 3 / best


def flops_per_token(num_params: int, layers: int, hidden: int, seq_len: float) -> float:
    """Training FLOPs per sequence token: 6·N + 12·L·d·s (see the module docstring)."""
    return 6 * num_params + 12 * layers * hidden * seq_len


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.train_layout", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    p.add_argument("--layouts", nargs="+", type=parse_layout, default=[parse_layout("2x1"), parse_layout("1x2")],
                   help="layouts to time, RANKSxTHREADS[:MICRO] (default: 2x1 1x2)")
    p.add_argument("--batch", type=int, default=8, help="trajectories per optimizer step (default 8)")
    p.add_argument("--steps", type=int, default=4, help="steps per layout, the first a warm-up (default 4)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps: at least 2 (the first is a warm-up)")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    import ray

    from jobs._cli import init_ray
    from searche1_ray.config import load_config
    from searche1_ray.data.prepare import prepare_data
    from searche1_ray.model_store import resolve_model
    from searche1_ray.pipelines import warmstart_samples
    from searche1_ray.training.runner import TrainRunner
    from searche1_ray.training.tasks import SFTTask
    from searche1_ray.training.warmstart import oracle_training_examples

    n = args.batch * args.steps
    base = ["run.name=bench-train-layout", "run.dashboard=false", f"warmstart.num_examples={n}", *args.overrides]
    cfg = load_config(args.config, base)
    model = resolve_model(cfg.model.name, cfg.model.cache_dir, cfg.model.dtype)
    data = prepare_data(cfg)
    init_ray(cfg, None)
    results = []
    try:
        samples = warmstart_samples(oracle_training_examples(cfg, data), model, cfg.model.use_chat_template,
                                    cfg.train.max_seq_len)
        batches = [samples[i:i + args.batch] for i in range(0, len(samples), args.batch)][: args.steps]
        seq = [sum(len(s["input_ids"]) for s in b) for b in batches]
        log.info("%d batches of %d trajectories: %d sequence tokens per batch on average",
                 len(batches), args.batch, sum(seq) // len(seq))
        import torch
        from transformers import AutoConfig

        from searche1_ray.hardware import resolve_bf16

        mc = AutoConfig.from_pretrained(model)
        num_params = _num_params(model)
        mean_len = sum(seq) / sum(len(b) for b in batches)
        fpt = flops_per_token(num_params, mc.num_hidden_layers, mc.hidden_size, mean_len)
        dtype = torch.bfloat16 if resolve_bf16(cfg.train.bf16, cfg.train.use_gpu) else torch.float32
        cores = len(os.sched_getaffinity(0))
        peak = matmul_peak(dtype, cores)
        print(f"matmul peak ({str(dtype).replace('torch.', '')}, {cores} threads, 2048^3): {peak / 1e9:.0f} GFLOP/s; "
              f"model {num_params / 1e6:.1f} M parameters, {fpt / 1e9:.2f} GFLOP per sequence token "
              f"at a mean length of {mean_len:.0f}", flush=True)
        for ranks, threads, mb in args.layouts:
            over = [f"train.num_workers={ranks}", f"train.cpus_per_worker={threads}"]
            if mb is not None:
                over.append(f"train.micro_batch_size={mb}")
            lcfg = load_config(args.config, [*base, *over])
            name = f"{ranks}x{threads}:{lcfg.train.micro_batch_size}"
            with tempfile.TemporaryDirectory(prefix="layout") as tmp:
                t0 = time.time()
                runner = TrainRunner(lcfg, model, SFTTask.from_config(lcfg, len(batches)), tmp)
                start_s = time.time() - t0
                times = []
                try:
                    for b in batches:
                        t = time.time()
                        runner.step(b)
                        times.append(time.time() - t)
                finally:
                    runner.stop()
            med = statistics.median(times[1:])
            tok_s = statistics.median(s / t for s, t in zip(seq[1:], times[1:]))
            results.append((name, med))
            mfu = tok_s * fpt / peak
            print(f"{name:>8}: start {start_s:5.1f} s, step {med:6.2f} s (median of {len(times) - 1}; "
                  f"all {' '.join(f'{t:.1f}' for t in times)}), {tok_s:6.0f} sequence tokens/s, "
                  f"MFU {100 * mfu:.1f} %", flush=True)
    finally:
        ray.shutdown()
    first = results[0]
    best = min(results, key=lambda r: r[1])
    print(f"{best[0]}_vs_{first[0]}={first[1] / best[1]:.2f}")
    return 0


def _num_params(model_dir: str) -> int:
    """Parameters in a safetensors HF folder (tied embeddings counted once), read from headers."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                total += math.prod(h.get_slice(k).get_shape())
    return total


if __name__ == "__main__":
    sys.exit(main())
