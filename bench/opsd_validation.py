"""Validating an OPSD adapter with vLLM: LoRA serving (``enable_lora``) vs merged weights pushed in place.

Two ways to measure dev EM of a LoRA-trained policy with the rollout engine:

  lora   : the engine starts with ``enable_lora=True``; each generate call carries a
           ``LoRARequest`` naming the saved adapter folder (a new checkpoint = a new adapter)
  merged : a plain engine; the merged weights W + ΔW (``opsd_task.merged_state_dict``) are loaded
           in place with ``reload_weights`` (``engine.vllm_engine.load_state_into``)

Each variant runs in a fresh subprocess (an in-process vLLM engine cannot be torn down cleanly)
on the same prompts: greedy, one turn, ``--max-tokens`` tokens. Reported per variant: engine
start-up, the cost of installing a new checkpoint (adapter load on the first request / in-place
reload), generation throughput with and without the adapter, peak RSS; and how often the greedy
outputs of the two variants agree with each other and with the base model. The adapter is a
fixed random one (rank/alpha/targets from the config, B ~ N(0, --b-std)) so the run needs no
training. Throughputs are the best of --repeats runs (the machine may be shared). Last line: ``throughput_ratio=<lora/merged>``.

    python bench/opsd_validation.py
    python bench/opsd_validation.py --prompts 64 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs as `python bench/<name>.py` too


def _prompts(n: int, tok) -> list[list[int]]:
    from searche1_ray.data.world import generate_world
    from searche1_ray.trajectory import build_prompt

    world = generate_world(seed=0, num_questions=max(40, 4 * n))
    qs = (world.dev + world.test + world.train)[:n]
    return [tok(build_prompt(q["question"], tok), add_special_tokens=False)["input_ids"] for q in qs]


def make_adapter(policy: str, out: Path, b_std: float, seed: int) -> None:
    """A LoRA adapter (peft folder) and the matching merged state dict (safetensors)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from searche1_ray.config import load_config
    from searche1_ray.training.opsd_task import OPSDTask, merged_state_dict

    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    torch.manual_seed(seed)
    task = OPSDTask(cfg)
    pm = task.prepare_model(AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32), cfg)
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0.0, b_std)
    task.save_adapter(pm, out / "adapter")
    save_file(merged_state_dict(pm, dtype=torch.bfloat16), str(out / "merged.safetensors"))


def run_variant(variant: str, policy: str, work: Path, n: int, max_tokens: int, repeats: int = 3) -> dict:
    from transformers import AutoTokenizer

    from searche1_ray.config import load_config
    from searche1_ray.engine.vllm_engine import build_llm, load_state_into

    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    tok = AutoTokenizer.from_pretrained(policy)
    prompts = _prompts(n, tok)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    extra = {"enable_lora": True, "max_lora_rank": cfg.opsd.lora_r, "max_loras": 1} if variant == "lora" else {}
    t0 = time.perf_counter()
    llm = build_llm(cfg.rollout, policy, extra=extra, max_model_len=2048)
    res: dict = {"variant": variant, "start_s": time.perf_counter() - t0}

    def gen(**kw):  # best of ``repeats`` runs: the machine is shared, the fastest run is the engine's
        best = None
        for _ in range(repeats):
            t = time.perf_counter()
            outs = llm.generate(inputs, params, use_tqdm=False, **kw)
            dt = time.perf_counter() - t
            if best is None or dt < best[2]:
                toks = sum(len(o.outputs[0].token_ids) for o in outs)
                best = ([list(o.outputs[0].token_ids) for o in outs], toks / dt, dt)
        return best

    base_ids, res["base_tok_s"], _ = gen()
    if variant == "lora":
        from vllm.lora.request import LoRARequest

        req = LoRARequest("opsd", 1, str(work / "adapter"))
        # the first request with a new adapter loads it: its extra time is the "install" cost
        one = [inputs[0]]
        t = time.perf_counter()
        llm.generate(one, SamplingParams(temperature=0.0, max_tokens=1), lora_request=req, use_tqdm=False)
        res["install_s"] = time.perf_counter() - t
        ids, res["adapter_tok_s"], res["adapter_gen_s"] = gen(lora_request=req)
    else:
        from safetensors.torch import load_file

        sd = load_file(str(work / "merged.safetensors"))
        t = time.perf_counter()
        load_state_into(llm, sd, in_process=True)
        res["install_s"] = time.perf_counter() - t
        ids, res["adapter_tok_s"], res["adapter_gen_s"] = gen()
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res["outputs"], res["base_outputs"] = ids, base_ids
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--b-std", type=float, default=0.02, help="std of the random LoRA B matrices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="generation runs per measurement (the fastest counts)")
    p.add_argument("--variant", choices=["lora", "merged"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    from searche1_ray.model_store import resolve_model

    policy = resolve_model()
    if args.variant:  # child process
        res = run_variant(args.variant, policy, Path(args.work), args.prompts, args.max_tokens, args.repeats)
        print("RESULT " + json.dumps(res))
        return
    with tempfile.TemporaryDirectory(prefix="opsd-val-") as d:
        work = Path(d)
        make_adapter(policy, work, args.b_std, args.seed)
        results = {}
        for variant in ("merged", "lora"):
            cmd = [sys.executable, __file__, "--variant", variant, "--work", str(work),
                   "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens),
                   "--repeats", str(args.repeats)]
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                print(f"{variant} failed (rc {out.returncode}):\n{out.stderr[-4000:]}")
                results[variant] = None
                continue
            results[variant] = json.loads(line[0][len("RESULT "):])
    for v, r in results.items():
        if r:
            print(f"{v:7s} start {r['start_s']:6.1f} s | install a checkpoint {r['install_s']:6.2f} s | "
                  f"base {r['base_tok_s']:6.1f} tok/s | with adapter {r['adapter_tok_s']:6.1f} tok/s | "
                  f"peak RSS {r['peak_rss_gib']:.2f} GiB")
    m, l = results.get("merged"), results.get("lora")
    if m and l:
        n = len(m["outputs"])
        same = sum(a == b for a, b in zip(m["outputs"], l["outputs"])) / n
        moved = sum(a != b for a, b in zip(m["outputs"], m["base_outputs"])) / n
        first_tok = sum(a[:16] == b[:16] for a, b in zip(m["outputs"], l["outputs"])) / n
        print(f"greedy outputs: merged == lora for {same:.0%} of prompts ({first_tok:.0%} on the first "
              f"16 tokens); the adapter changed {moved:.0%} of the base outputs")
        print(f"throughput_ratio={l['adapter_tok_s'] / m['adapter_tok_s']:.3f}")


if __name__ == "__main__":
    main()
