"""OPSD on the real SmolLM2-135M: teacher = base model, the loss falls on a fixed pair set, the merged
policy reproduces the adapter model, the task under the real Ray Train runner, and (when the
rollout pool exists) a whole OPSD round on tiny settings with the best-EM checkpoint kept.

The fixed pair set: synthetic-world questions; reference = the clean oracle trajectory (correct),
student = a noisy oracle trajectory whose answer was replaced by a wrong one (incorrect), mined
by ``pairs.mine_group`` exactly as the round does.
"""

import json
import math
import time
from pathlib import Path

import pytest
import torch

from searche1_ray.config import load_config
from searche1_ray.model_store import resolve_model
from searche1_ray.pairs import mine_group
from searche1_ray.trajectory import assemble, build_prompt
from tests.integration.conftest import ray_fixture

pytestmark = pytest.mark.slow

WRONG = "Nobody Inparticular"


def _config(*extra):
    return load_config(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml",
                       ["train.max_seq_len=640", "opsd.batch_size=2", *extra])


def _rows(example, tok, idx, reward, wrong=None):
    segs, texts = [], []
    for text, by_policy in example["segments"]:
        if wrong and by_policy and "<answer>" in text:
            text = text.replace(example["golden_answers"][0], wrong)
        texts.append(text)
        segs.append((tok(text, add_special_tokens=False)["input_ids"], by_policy))
    ids, mask = assemble(segs)
    return {"question_id": example["question_id"], "sample_idx": idx, "question": example["question"],
            "golden_answers": example["golden_answers"], "response": "".join(texts),
            "prompt_ids": tok(build_prompt(example["question"], tok), add_special_tokens=False)["input_ids"],
            "response_ids": ids, "loss_mask": mask,
            "num_searches": sum(1 for t, p in example["segments"] if p and "<search>" in t), "reward": reward}


def fixed_pairs(cfg, tok, n=2):
    from searche1_ray.data.oracle import oracle_examples
    from searche1_ray.data.world import generate_world
    from searche1_ray.training.opsd_task import make_sample

    world = generate_world(seed=0, num_questions=40)
    clean = oracle_examples(world, "train", seed=0, noisy_frac=0.0)
    noisy = {e["question_id"]: e for e in oracle_examples(world, "train", seed=1, noisy_frac=1.0)}
    # single-hop questions first: the shortest trajectories
    clean.sort(key=lambda e: sum(1 for _, p in e["segments"] if not p))
    samples = []
    for e in clean:
        pair = mine_group([_rows(e, tok, 0, 1.0), _rows(noisy[e["question_id"]], tok, 1, 0.0, wrong=WRONG)])
        assert pair["status"] == "pair" and pair["student_kind"] == "incorrect"
        s = make_sample(pair, tok, cfg)
        if s is not None:
            samples.append(s)
        if len(samples) == n:
            return samples
    raise AssertionError("not enough fixed pairs")


@pytest.fixture(scope="module")
def policy(model_path):
    return model_path


@pytest.fixture(scope="module")
def trained(policy, tok):
    """A LoRA policy trained single-process (fp32, no Ray) on the fixed pairs; the base model."""
    from transformers import AutoModelForCausalLM

    from searche1_ray.training.opsd_task import OPSDTask

    cfg = _config("train.bf16=false", "opsd.lr=1e-3")
    pairs = fixed_pairs(cfg, tok)
    torch.manual_seed(0)
    task = OPSDTask(cfg, pad_id=tok.pad_token_id)
    pm = task.prepare_model(AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32), cfg)
    base = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    batch = task.collate(pairs)
    with torch.no_grad():
        teacher_before = _teacher_logits(pm, batch)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=task.lr)
    kls = []
    for _ in range(4):
        loss, m = task.loss(pm, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        kls.append(m["opsd/kl"])
    with torch.no_grad():
        kls.append(task.loss(pm, batch)[1]["opsd/kl"])
    return {"cfg": cfg, "task": task, "pm": pm.eval(), "base": base, "pairs": pairs, "batch": batch,
            "kls": kls, "teacher_before": teacher_before}


def _teacher_logits(pm, batch):
    with pm.disable_adapter():
        return pm(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits


def test_loss_falls_on_a_fixed_pair_set(trained):
    kls = trained["kls"]
    print("KL on the fixed pair set, before each step and after the last:", [round(k, 4) for k in kls])
    assert kls[0] > 0.05, "teacher and student should disagree before training"
    assert kls[-1] < 0.6 * kls[0]
    assert all(b < a for a, b in zip(kls, kls[1:]))


def test_teacher_is_the_base_model_and_the_student_moved(trained):
    pm, base, batch = trained["pm"], trained["base"], trained["batch"]
    with torch.no_grad():
        teacher = _teacher_logits(pm, batch)
        ref = base(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
        student = pm(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    att = batch["teacher_attention_mask"].bool()
    torch.testing.assert_close(teacher[att], ref[att], rtol=0, atol=0)
    torch.testing.assert_close(teacher[att], trained["teacher_before"][att], rtol=0, atol=0)  # base frozen
    assert (student[att] - ref[att]).abs().max() > 0.1


def test_merged_policy_reproduces_the_adapter_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from searche1_ray.training.opsd_task import merge_adapter_into_policy, merged_state_dict

    pm, batch, policy = trained["pm"], trained["batch"], resolve_model()
    x, att = batch["student_input_ids"], batch["student_attention_mask"]
    with torch.no_grad():
        want = pm(input_ids=x, attention_mask=att).logits[att.bool()]
    # (a) the exported state dict the rollout pool receives
    plain = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    plain.load_state_dict(merged_state_dict(pm, dtype=torch.float32), strict=False)
    plain.tie_weights()
    # (b) the saved adapter, merge_and_unload-ed into a full folder
    trained["task"].save_adapter(pm, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    folder = merge_adapter_into_policy(policy, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        got_a = plain(input_ids=x, attention_mask=att).logits[att.bool()]
        got_b = merged(input_ids=x, attention_mask=att).logits[att.bool()]
    diff_a, diff_b = (got_a - want).abs().max().item(), (got_b - want).abs().max().item()
    print(f"merged vs adapter logits, max |diff|: export {diff_a:.2e}, merge_and_unload {diff_b:.2e}")
    assert diff_a < 1e-3 and diff_b < 1e-3
    assert (want - AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)(
        input_ids=x, attention_mask=att).logits[att.bool()]).abs().max() > 0.1


# ------------------------------------------------------------------------------ under Ray Train

ray_cluster = ray_fixture("r6", num_cpus=4, repo_on_pythonpath=True)


def test_opsd_task_under_the_ray_train_runner(ray_cluster, policy, tok, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from searche1_ray.training.opsd_task import OPSDTask
    from searche1_ray.training.runner import TrainRunner

    cfg = _config("opsd.lr=1e-3")
    pairs = fixed_pairs(cfg, tok)
    runner = TrainRunner(cfg, policy, OPSDTask(cfg, pad_id=tok.pad_token_id), tmp_path / "train")
    try:
        kls = []
        for _ in range(3):
            m = runner.step(pairs)
            kls.append(m["opsd/kl"])
            assert 0.0 <= m["opsd/clip_frac"] <= 1.0 and m["opsd/optimizer_steps"] == 1
        print("runner KL per step:", [round(k, 4) for k in kls], f"{m['perf/train_s']:.1f} s/step")
        assert kls[-1] < kls[0]
        weights = runner.get_weights()
        folder = runner.save_checkpoint(str(tmp_path / "ckpt"))
    finally:
        runner.stop()
    base = load_file(str(Path(policy) / "model.safetensors"))
    assert set(weights) == set(base)                       # plain HF names, no lora_ / base_layer
    changed = [k for k in weights if not torch.equal(weights[k], base[k])]
    assert changed and all(any(t in k for t in cfg.opsd.target_modules) for k in changed)
    from searche1_ray.hardware import resolve_dtype

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, resolve_dtype("auto")))
    saved = model.state_dict()
    for k in changed[:5]:
        torch.testing.assert_close(saved[k], weights[k], rtol=0, atol=0)


# ------------------------------------------------------------------------------ the whole round

def test_opsd_round_end_to_end(ray_cluster, policy, tmp_path):
    """Warm start (the raw SmolLM2 never answers in the protocol, so no pair could be mined) →
    rollout pool on the warm policy → a tiny OPSD round on questions the warm start saw."""
    from actors.retriever import start_retriever
    from actors.rollout_worker import RolloutPool
    from searche1_ray.data.prepare import prepare_data
    from searche1_ray.data.readers import read_qa
    from searche1_ray.training.opsd_round import run_opsd_round, select_best
    from searche1_ray.training.warmstart import oracle_training_examples, run_warmstart

    cfg = _config(f"data.dir={tmp_path / 'world'}", "data.world.num_questions=60",
                  f"retriever.port={_free_port()}", f"retriever.index_dir={tmp_path / 'index'}",
                  "warmstart.num_examples=8", "warmstart.epochs=3", "warmstart.lr=5e-4",
                  "warmstart.batch_size=2",
                  "opsd.questions_per_round=8", "opsd.samples_per_question=3", "opsd.steps=2",
                  "opsd.eval_every=2", "rollout.max_turn_tokens=64", "rollout.questions_per_batch=8")
    data = prepare_data(cfg)
    mem = _PeakMemory()
    t0 = time.time()
    warm, wm = run_warmstart(cfg, policy, str(tmp_path / "warm"), data)
    warm_s = time.time() - t0
    seen = {e["question_id"] for e in oracle_training_examples(cfg, data)}
    train = [q for q in read_qa(data.train) if q["id"] in seen]
    dev = read_qa(data.dev)[:4]
    handle, _ = start_retriever(cfg, str(data.corpus), str(tmp_path / "index"))
    pool = RolloutPool(cfg, warm, handle)
    try:
        t0 = time.time()
        folder, metrics = run_opsd_round(cfg, pool, warm, train, dev, tmp_path / "opsd", version=1,
                                         progress=False)
        round_s = time.time() - t0
    finally:
        pool.shutdown()
        mem.stop()
    print(json.dumps({k: v for k, v in metrics.items() if k != "opsd/history"}, indent=1, default=str))
    print(f"warm start {warm_s:.0f} s (loss {wm['warmstart/loss_first']:.3f} -> {wm['warmstart/loss_last']:.3f}); "
          f"OPSD round {round_s:.0f} s; peak RSS of this test's processes {mem.peak_gib:.1f} GiB")
    assert (tmp_path / "opsd" / "rollouts.parquet").is_file() and (tmp_path / "opsd" / "pairs.parquet").is_file()
    assert metrics["opsd/pairs"] >= 1, "the warm policy got no training question right: no pair to train on"
    assert metrics["opsd/pairs"] + metrics["opsd/dropped"] == 8
    evals = metrics["opsd/evals"]
    assert [e["step"] for e in evals] == [0, 2]
    best = select_best(evals)
    assert metrics["opsd/best_step"] == best["step"] and metrics["eval/em"] == best["em"]
    left = list((tmp_path / "opsd" / "checkpoints").iterdir()) if (tmp_path / "opsd" / "checkpoints").exists() else []
    assert left == []  # at most one checkpoint was kept, and it became the policy
    if best["step"] == 0:
        assert folder == warm
    else:
        assert folder == str(tmp_path / "opsd" / "policy") and (Path(folder) / "model.safetensors").is_file()
    for k in ("opsd/kl", "opsd/clip_frac", "opsd/kl_first", "opsd/kl_last"):
        assert math.isfinite(metrics[k])


class _PeakMemory:
    """Peak summed RSS of this process and its children (the local Ray: raylet, workers, vLLM),
    sampled every second in a thread (shared pages count once per process: an upper bound)."""

    def __init__(self):
        import threading

        import psutil

        self.peak_gib, self._stop = 0.0, threading.Event()
        me = psutil.Process()

        def sample():
            while not self._stop.wait(1.0):
                total = 0
                for p in [me, *me.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_gib = max(self.peak_gib, total / 2**30)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
