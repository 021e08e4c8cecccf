"""Ray Train runner on SmolLM2-135M: 2 workers, DeepSpeed ZeRO-2 over gloo, GRPO and SFT tasks.

Checks: the GRPO pipeline on hand-made rollout rows through Ray Data (advantages, Parquet,
aligned masks); the on-policy importance ratio is 1 on the first minibatch when the old
log-probs come from the trainer's own model; the masked loss equals its closed form at ratio 1;
exported weights equal the trainer's model (same log-probs in a fresh HF model); a checkpoint
reloads as an HF model and is registered with Ray Train; SFT lowers the loss on its batch.
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.integration.conftest import ray_fixture
from searche1_ray.hardware import resolve_dtype

pytestmark = pytest.mark.slow


ray_local = ray_fixture("h5r", num_cpus=4)


def _cfg(*overrides):
    from searche1_ray.config import load_config

    return load_config(None, ["train.num_workers=2", "train.cpus_per_worker=1", "train.zero_stage=2",
                              "train.micro_batch_size=2", "train.max_seq_len=256",
                              *overrides])


def _rollout_rows(tok):
    """Two questions x 3 trajectories in the rollout-row schema; policy text and a retrieved
    <information> block (mask 0) in between, logprobs filled in later."""
    from searche1_ray.trajectory import build_prompt, information_block

    rows = []
    specs = [("q-a", "Where was Ann Lee born", ["Paris", "Rome", "Paris"], [1.0, 0.0, 1.0]),
             ("q-b", "Who founded Blue Press", ["Tom", "Tom", "Tom"], [0.0, 0.0, 0.0])]
    for qid, question, answers, rewards in specs:
        prompt = build_prompt(question, tok)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        for i, (ans, rew) in enumerate(zip(answers, rewards)):
            turn1 = tok(f"<think>I should look it up.</think>\n<search> {question} </search>",
                        add_special_tokens=False)["input_ids"]
            info = tok(information_block([f'"{ans} page"\n{question}: {ans}.']),
                       add_special_tokens=False)["input_ids"]
            turn2 = tok(f"<think>Found it{'!' * i}</think>\n<answer> {ans} </answer>",
                        add_special_tokens=False)["input_ids"]
            resp = turn1 + info + turn2
            mask = [1] * len(turn1) + [0] * len(info) + [1] * len(turn2)
            rows.append({"question_id": qid, "sample_idx": i, "question": question,
                         "golden_answers": [answers[0]], "prompt": prompt,
                         "response": tok.decode(resp), "prompt_ids": p_ids,
                         "response_ids": resp, "loss_mask": mask, "logprobs": [0.0] * len(resp),
                         "num_searches": 1, "queries": [question], "answer": ans, "reward": rew,
                         "finish_reason": "stop", "policy_version": 0})
    return rows


def test_grpo_pipeline_on_hand_made_rows(ray_local, tok, tmp_path):
    from searche1_ray.pipelines import grpo_batch

    rows = _rollout_rows(tok)
    out = tmp_path / "rollouts" / "step0000.parquet"
    samples, adv_rows = grpo_batch(list(reversed(rows)), max_seq_len=256, parquet_path=out)
    assert len(samples) == 6
    df = pd.read_parquet(out)
    assert len(df) == 6 and {"question_id", "response", "reward", "advantage"} <= set(df.columns)
    a = df[df.question_id == "q-a"].sort_values("sample_idx").advantage.to_numpy()
    r = np.array([1.0, 0.0, 1.0])
    np.testing.assert_allclose(a, (r - r.mean()) / (r.std(ddof=1) + 1e-6), rtol=1e-5)
    assert (df[df.question_id == "q-b"].advantage == 0).all()
    by_key = {(s["question_id"], s["sample_idx"]): s for s in samples}
    for row in rows:
        s = by_key[(row["question_id"], row["sample_idx"])]
        n = len(row["prompt_ids"])
        assert s["input_ids"].tolist() == row["prompt_ids"] + row["response_ids"]
        assert s["loss_mask"][:n].sum() == 0 and s["loss_mask"][n:].tolist() == row["loss_mask"]
        policy_text = tok.decode([t for t, m in zip(s["input_ids"], s["loss_mask"]) if m])
        assert "<information>" not in policy_text and "<answer>" in policy_text
    dropped, _ = grpo_batch(rows, 256, None, drop_zero_advantage=True)
    assert {s["question_id"] for s in dropped} == {"q-a"}


def test_grpo_runner_on_policy_ratio_weights_and_checkpoint(ray_local, model_path, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from searche1_ray.pipelines import grpo_batch
    from searche1_ray.training.runner import TrainRunner
    from searche1_ray.training.tasks import GRPOTask, causal_logprobs, pad_samples

    cfg = _cfg("grpo.lr=4e-5", "grpo.warmup_steps=4", "grpo.kl_coef=0.001", "grpo.mini_batch_size=0")
    samples, adv_rows = grpo_batch(_rollout_rows(tok), 256)
    runner = TrainRunner(cfg, model_path, GRPOTask(cfg), tmp_path / "run")
    try:
        # old log-probs = the trainer's own: exactly on-policy
        trainer_lp = runner.compute_logprobs(samples)
        for s, lp in zip(samples, trainer_lp):
            assert len(lp) == len(s["input_ids"]) and lp[0] == 0.0
            s["old_logprobs"] = np.where(s["loss_mask"] > 0, lp, 0.0).astype(np.float32)
        m = runner.step(samples)
        assert m["grpo/ratio_dev"] < 2e-2, m          # |ρ − 1| on the first minibatch
        assert abs(m["grpo/ratio_mean"] - 1.0) < 1e-2, m
        assert m["grpo/logprob_gap"] < 2e-2, m
        # at ρ ≈ 1 the clipped surrogate is −(token-mean of the advantages over policy tokens)
        n_tok = [int(s["loss_mask"].sum()) for s in samples]
        expected = -sum(float(s["advantage"]) * n for s, n in zip(samples, n_tok)) / sum(n_tok)
        assert m["grpo/pg_loss"] == pytest.approx(expected, abs=2e-2)
        assert m["grpo/kl"] < 1e-3 and m["grpo/grad_norm"] > 0 and math.isfinite(m["grpo/loss"])
        assert m["grpo/loss_tokens"] == sum(n_tok) and m["grpo/optimizer_steps"] == 1
        assert m["perf/train_s"] > 0

        # the update moved the policy: trainer log-probs changed
        after_lp = runner.compute_logprobs(samples[:1])[0]
        assert np.abs(after_lp - trainer_lp[0]).max() > 1e-4

        # weight export equals the trainer's model
        weights = runner.get_weights()
        dt = getattr(torch, resolve_dtype("auto"))  # train.bf16 "auto": what the ranks trained in
        assert "model.embed_tokens.weight" in weights and all(v.dtype == dt for v in weights.values())
        fresh = AutoModelForCausalLM.from_pretrained(model_path, dtype=dt)
        missing, unexpected = fresh.load_state_dict(weights, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        fresh.eval()
        with torch.no_grad():
            b = pad_samples(samples[:1], ["input_ids"])
            lp = causal_logprobs(fresh, b["input_ids"], b["attention_mask"])[0].numpy()
        np.testing.assert_allclose(lp, after_lp[1:], atol=1e-4)

        # checkpoint: an HF folder transformers loads, registered with Ray Train
        folder = Path(runner.save_checkpoint("step1"))
        assert folder == (tmp_path / "run" / "checkpoints" / "step1").resolve()
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
        sd = reloaded.state_dict()
        for k in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
            assert torch.equal(sd[k], weights[k]), k
        assert (folder / "tokenizer_config.json").is_file()
        persisted = list((tmp_path / "run" / "ray_train").glob("*/step1/model.safetensors"))
        assert len(persisted) == 1
        path2 = runner.save_checkpoint(str(tmp_path / "elsewhere" / "ck"))
        assert Path(path2) == (tmp_path / "elsewhere" / "ck").resolve() and Path(path2, "config.json").is_file()
        m2 = runner.step(samples)                         # the run goes on from step 1 ...
        weights2 = runner.get_weights()
    finally:
        runner.stop()
    assert not runner._thread.is_alive()
    assert not runner.storage.exists() and Path(folder, "model.safetensors").is_file()  # Ray Train's copy went
    with pytest.raises(RuntimeError, match="stopped"):
        runner.step(samples)

    # ... and a runner resumed from step 1's checkpoint makes the same second step: Adam's
    # moments and the lr schedule's position came back with it (warm-up 4: its 2nd update at lr x 2/4,
    # where a fresh schedule would start again at 1/4)
    assert json.loads((folder / "trainer_state" / "layout.json").read_text()) == {"world": 2, "zero_stage": 2}
    resumed = TrainRunner(cfg, str(folder), GRPOTask(cfg, reference_path=model_path, resume_from=str(folder)),
                          tmp_path / "run2")
    try:
        r2 = resumed.step(samples)
        resumed_weights2 = resumed.get_weights()
    finally:
        resumed.stop()
    # grpo/lr is the schedule's lr after the step: 2/4 x lr after the first, 3/4 after the second
    print(f"\nlr after step 1 {m['grpo/lr']:.3g}, step 2 {m2['grpo/lr']:.3g}, resumed step 2 {r2['grpo/lr']:.3g}")
    assert m2["grpo/lr"] == pytest.approx(1.5 * m["grpo/lr"]) and r2["grpo/lr"] == pytest.approx(m2["grpo/lr"])
    moved = max(float((weights2[k].float() - weights[k].float()).abs().max()) for k in weights)
    gap = max(float((resumed_weights2[k].float() - weights2[k].float()).abs().max()) for k in weights)
    print(f"\nsecond step: moved the weights by up to {moved:.3g}; resumed vs uninterrupted {gap:.3g}")
    assert moved > 0 and gap < 0.05 * moved


def test_sft_runner_lowers_loss_on_policy_tokens_with_gradient_checkpointing(ray_local, model_path, tok, tmp_path):
    from searche1_ray.pipelines import sft_sample
    from searche1_ray.training.runner import TrainRunner
    from searche1_ray.training.tasks import SFTTask
    from searche1_ray.trajectory import build_prompt, information_block

    cfg = _cfg("train.micro_batch_size=2", "train.gradient_checkpointing=true")
    samples = []
    for i, (q, a) in enumerate([("Where was Ann Lee born", "Paris"), ("Who founded Blue Press", "Tom Hall"),
                                ("When was Zed built", "1901")]):
        p = tok(build_prompt(q, tok), add_special_tokens=False)["input_ids"]
        segs = [(tok(f"<think>Search.</think>\n<search> {q} </search>", add_special_tokens=False)["input_ids"], True),
                (tok(information_block([f'"Doc"\n{q}: {a}.']), add_special_tokens=False)["input_ids"], False),
                (tok(f"<think>So it is {a}.</think>\n<answer> {a} </answer>", add_special_tokens=False)["input_ids"], True)]
        samples.append(sft_sample(p, segs, 256))
    runner = TrainRunner(cfg, model_path, SFTTask(5e-5), tmp_path / "sft")
    try:
        losses = [runner.step(samples)["sft/loss"] for _ in range(3)]
    finally:
        runner.stop()
    assert losses[2] < losses[0] - 0.1, losses


def _fixed_retriever(queries, topk):
    """Retrieval is irrelevant to weight sync: every query gets the same passage."""
    hit = {"document": {"id": "0", "contents": '"Ann Lee"\nAnn Lee was born in Paris.'}, "score": 1.0}
    return [[hit] * topk for _ in queries]


def _gap(rows, trainer_lps):
    """Mean |trainer log-prob − engine log-prob| over the policy-written tokens of ``rows``."""
    diffs = []
    for row, lp in zip(rows, trainer_lps):
        resp_lp = lp[len(row["prompt_ids"]):]
        for m, engine_lp, trainer in zip(row["loss_mask"], row["logprobs"], resp_lp):
            if m:
                diffs.append(abs(engine_lp - trainer))
    assert diffs, "the engine wrote no policy tokens"
    return float(np.mean(diffs))


def _sync_setup(tok):
    from searche1_ray.pipelines import sft_sample
    from searche1_ray.trajectory import build_prompt

    cfg = _cfg("train.max_seq_len=512", "rollout.num_workers=1", "rollout.group_size=2",
               "rollout.max_turn_tokens=40", "rollout.max_response_tokens=96", "rollout.max_searches=1",
               "rollout.questions_per_batch=4", "rollout.temperature=1.0", "rollout.num_cpus_per_worker=1")
    questions = [{"id": f"q{i}", "question": q, "golden_answers": ["x"]}
                 for i, q in enumerate(["Where was Ann Lee born", "Who wrote Blue Harbour", "When did Zed open"])]
    sft = []
    for q in questions:
        p = tok(build_prompt(q["question"], tok), add_special_tokens=False)["input_ids"]
        text = "<think>I know this one.</think>\n<answer> Paris </answer>"
        sft.append(sft_sample(p, [(tok(text, add_special_tokens=False)["input_ids"], True)], 512))
    return cfg, questions, sft


def _engine_gap(runner, pool, questions, version):
    """Sample with the pool, then the trainer's mean |log-prob gap| on the engine's tokens."""
    from searche1_ray.pipelines import grpo_sample

    rows = pool.generate(questions, n=2)
    assert all(r["policy_version"] == version for r in rows)
    samples = [grpo_sample({**r, "advantage": 0.0}, 512) for r in rows]
    return _gap(rows, runner.compute_logprobs(samples))


def test_weight_sync_object_store_then_broadcast(ray_local, model_path, tok, tmp_path):
    """After a sync the rollout engine samples with the trainer's weights: the trainer's
    log-probs of the engine's tokens match the engine's own up to bf16 kernel noise, while
    before the sync they differ by the whole update. Both paths, on one trainer and one engine:
    the object store (CPU default), then the collective path (NCCL on GPUs, gloo here) where
    trainer rank 0 broadcasts to the engines, twice (the second sync reuses the open group)."""
    from actors.rollout_worker import RolloutPool
    from searche1_ray.training.runner import TrainRunner
    from searche1_ray.training.tasks import SFTTask

    cfg, questions, sft = _sync_setup(tok)
    runner = TrainRunner(cfg, model_path, SFTTask(3e-4), tmp_path / "sync")
    pool = RolloutPool(cfg, model_path, _fixed_retriever)
    try:
        for _ in range(2):  # move the policy well away from the engine's weights
            runner.step(sft)
        gap_stale = _engine_gap(runner, pool, questions, 0)
        pool.update_weights(runner.get_weights_ref(), version=1)
        gap_fresh = _engine_gap(runner, pool, questions, 1)
        # bf16 kernels differ between vLLM and torch: a few hundredths of a nat per token remain
        assert gap_fresh < 0.1 and gap_stale > 5 * gap_fresh, (gap_stale, gap_fresh)

        for version in (2, 3):
            runner.step(sft)
            assert _engine_gap(runner, pool, questions, version - 1) > 2 * gap_fresh  # stale again
            runner.broadcast_weights(pool, version=version)
            assert _engine_gap(runner, pool, questions, version) < 0.1
    finally:
        pool.shutdown()
        runner.stop()


def test_train_grpo_job_smoke(tmp_path):
    """`python -m jobs.train_grpo` end to end with tiny settings: the real retriever, rollout
    pool and runner on its own local Ray; rollouts, metrics and a checkpoint land in the run dir."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    sets = ["run.name=grpo-smoke", f"run.output_dir={tmp_path}", "run.num_cpus=6", "run.dashboard=false",
            "data.world.num_questions=100",   # ~200 passages: the index builds in seconds
            "grpo.questions_per_step=2", "grpo.checkpoint_every=1", "rollout.group_size=2",
            "rollout.max_turn_tokens=32", "rollout.max_response_tokens=160", "rollout.max_searches=1",
            "train.max_seq_len=512", "train.micro_batch_size=2"]
    cmd = [sys.executable, "-m", "jobs.train_grpo", "--steps", "1", "--drop-zero-advantage"]
    for kv in sets:
        cmd += ["--set", kv]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "GRPO round of 1 steps done" in proc.stdout
    run = tmp_path / "grpo-smoke"
    rows = pd.read_parquet(run / "rollouts" / "grpo" / "step0000.parquet")
    assert len(rows) == 4 and {"advantage", "reward", "loss_mask", "logprobs"} <= set(rows.columns)
    metrics = [json.loads(line) for line in (run / "grpo_metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1
    m = metrics[0]
    for key in ("rollout/reward_mean", "rollout/num_searches", "rollout/response_len", "perf/step_s",
                "perf/rollout_s", "perf/retrieval_s", "perf/train_s", "perf/sync_s"):
        assert key in m, key
    assert 0.0 <= m["perf/retrieval_s"] and m["perf/generate_s"] > 0.0
    assert (run / "checkpoints" / "grpo-step0001" / "model.safetensors").is_file()
