"""Pure pieces of the training data path: group advantages on rows, GRPO / SFT samples (masks and
old log-probs aligned to input_ids), padding, the runner's minibatch / loss-weight arithmetic and
the task losses against slow obvious reference implementations."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from searche1_ray.config import load_config
from searche1_ray.pipelines import grpo_sample, sft_sample, with_group_advantages
from searche1_ray.training.deepspeed_config import deepspeed_config
from searche1_ray.training.tasks import (GRPOTask, SFTTask, TrainTask, causal_logprobs, full_state_dict,
                                         masked_logprobs, pad_samples, rank_micro_batches)


def _row(qid, idx, reward, prompt, resp, mask, lps):
    return {"question_id": qid, "sample_idx": idx, "reward": reward, "prompt_ids": prompt,
            "response_ids": resp, "loss_mask": mask, "logprobs": lps}


def test_group_advantages_on_rows_sorted_and_normalised():
    rows = [_row("q", i, r, [1], [2], [1], [-0.5]) for i, r in [(2, 1.0), (0, 0.0), (1, 1.0), (3, 0.0)]]
    out = with_group_advantages(rows)
    assert [r["sample_idx"] for r in out] == [0, 1, 2, 3]
    rewards = [0.0, 1.0, 1.0, 0.0]
    mean = sum(rewards) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 3)  # unbiased
    for r, rew in zip(out, rewards):
        assert r["advantage"] == pytest.approx((rew - mean) / (std + 1e-6), abs=1e-6)
    equal = with_group_advantages([_row("q", i, 1.0, [1], [2], [1], [0.0]) for i in range(3)])
    assert all(r["advantage"] == 0.0 for r in equal)


def test_grpo_sample_aligns_mask_and_old_logprobs_to_input_ids():
    # prompt 3 tokens; response: policy 2 tokens, retrieved 2 tokens (mask 0), policy 1 token
    row = _row("q1", 0, 1.0, [10, 11, 12], [20, 21, 30, 31, 22], [1, 1, 0, 0, 1],
               [-0.1, -0.2, -9.0, -9.0, -0.3])
    row["advantage"] = 0.5
    s = grpo_sample(row, max_seq_len=64)
    assert s["input_ids"].tolist() == [10, 11, 12, 20, 21, 30, 31, 22]
    assert s["loss_mask"].tolist() == [0, 0, 0, 1, 1, 0, 0, 1]
    # logprobs of retrieved tokens are zeroed, prompt positions are 0
    np.testing.assert_allclose(s["old_logprobs"], [0, 0, 0, -0.1, -0.2, 0, 0, -0.3], atol=1e-7)
    assert s["advantage"] == pytest.approx(0.5)
    # every masked position holds a policy-written response token
    written = [t for t, m in zip(s["input_ids"], s["loss_mask"]) if m]
    assert written == [20, 21, 22]


def test_grpo_sample_truncates_and_names_bad_rows():
    row = _row("q1", 3, 0.0, [1, 2, 3], [4, 5, 6, 7], [1, 1, 1, 1], [-1.0, -1.0, -1.0, -1.0])
    row["advantage"] = -1.0
    s = grpo_sample(row, max_seq_len=5)
    assert s["input_ids"].tolist() == [1, 2, 3, 4, 5]
    assert s["loss_mask"].tolist() == [0, 0, 0, 1, 1]
    bad = dict(row, logprobs=[-1.0])
    with pytest.raises(ValueError, match="question_id='q1' sample_idx=3"):
        grpo_sample(bad, 64)
    with pytest.raises(ValueError, match="train.max_seq_len"):
        grpo_sample(row, 3)


def test_sft_sample_masks_only_policy_segments():
    s = sft_sample([1, 2], [([5, 6], True), ([7, 8, 9], False), ([10], True)], max_seq_len=100)
    assert s["input_ids"].tolist() == [1, 2, 5, 6, 7, 8, 9, 10]
    assert s["loss_mask"].tolist() == [0, 0, 1, 1, 0, 0, 0, 1]
    cut = sft_sample([1, 2], [([5, 6], True), ([7, 8, 9], False)], max_seq_len=5)
    assert cut["input_ids"].tolist() == [1, 2, 5, 6, 7]
    assert cut["loss_mask"].tolist() == [0, 0, 1, 1, 0]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=6))
def test_pad_samples_right_pads_and_keeps_alignment(lengths):
    rng = np.random.default_rng(len(lengths))
    samples = [{"input_ids": rng.integers(1, 50, n), "loss_mask": rng.integers(0, 2, n),
                "old_logprobs": -rng.random(n).astype(np.float32), "advantage": np.float32(i)}
               for i, n in enumerate(lengths)]
    b = pad_samples(samples, ["input_ids", "loss_mask", "old_logprobs", "advantage"])
    width = max(lengths)
    assert b["input_ids"].shape == (len(lengths), width)
    assert b["advantage"].tolist() == list(range(len(lengths)))
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert b["input_ids"][i, :n].tolist() == s["input_ids"].tolist()
        assert b["loss_mask"][i, n:].sum() == 0  # padding is never a loss token
        np.testing.assert_allclose(b["old_logprobs"][i, :n].numpy(), s["old_logprobs"], rtol=1e-6)


def test_minibatches_and_weights():
    task = TrainTask(1e-3, mini_batch_size=3)
    batch = [{"input_ids": [0] * 4, "loss_mask": [0, 1, 1, 0]} for _ in range(7)]
    mbs = task.minibatches(batch)
    assert [len(m) for m in mbs] == [3, 3, 1]
    assert task.sample_weight(batch[0]) == 2.0
    assert [len(m) for m in TrainTask(1e-3).minibatches(batch)] == [7]


def test_sharded_micro_losses_reweighted_equal_global_token_mean():
    """The runner's arithmetic: Σ_ranks Σ_micro loss_micro · w_micro / W · world, then the
    DeepSpeed average over ranks (/ world) == the token-mean over the whole minibatch."""
    rng = np.random.default_rng(0)
    tok_losses = [rng.random(int(rng.integers(1, 9))) for _ in range(11)]
    world, micro = 2, 2
    global_mean = np.concatenate(tok_losses).mean()
    W = sum(len(t) for t in tok_losses)
    per_rank = []
    for rank in range(world):
        mine = list(range(rank, len(tok_losses), world))
        total = 0.0
        for i in range(0, len(mine), micro):
            idx = mine[i:i + micro]
            w = sum(len(tok_losses[j]) for j in idx)
            loss_micro = np.concatenate([tok_losses[j] for j in idx]).mean()
            total += loss_micro * (w / W * world)
        per_rank.append(total)
    assert np.mean(per_rank) == pytest.approx(global_mean, rel=1e-12)


def test_lr_factor_warmup_then_decay():
    t = TrainTask(1.0, warmup_steps=2, total_steps=6)
    assert [t.lr_factor(s) for s in range(7)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert [TrainTask(1.0, warmup_steps=3).lr_factor(s) for s in range(5)] == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 1.0, 1.0])


class _TinyLM(torch.nn.Module):
    """A causal LM stand-in: logits depend on the current token only (enough for the losses)."""

    def __init__(self, vocab=13):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return type("Out", (), {"logits": self.emb(input_ids)})()


def _ref_token_logprob(model, ids, t):
    logits = model.emb.weight[ids[t - 1]]
    return float(torch.log_softmax(logits.detach().double(), -1)[ids[t]])


def test_sft_loss_equals_masked_token_mean_nll():
    model = _TinyLM()
    samples = [sft_sample([1, 2], [([3, 4], True), ([5], False), ([6], True)], 64),
               sft_sample([7], [([8], True), ([9, 10], False)], 64)]
    loss, m = SFTTask(1e-3).loss(model, pad_samples(samples, ["input_ids", "loss_mask"]))
    nll = []
    for s in samples:
        ids = s["input_ids"].tolist()
        nll += [-_ref_token_logprob(model, ids, t) for t in range(1, len(ids)) if s["loss_mask"][t]]
    assert len(nll) == 4
    assert float(loss.detach()) == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert m["sft/loss"] == pytest.approx(float(loss.detach()))


def test_grpo_loss_on_policy_ratio_one_and_masked_surrogate():
    cfg = load_config(None, ["grpo.kl_coef=0.0"])
    model = _TinyLM()
    task = GRPOTask(cfg)
    task.prepare_model(model, cfg)
    assert task.reference is None
    rows = [_row("q", 0, 1.0, [1, 2], [3, 4, 5, 6], [1, 0, 1, 1], [0.0] * 4),
            _row("q", 1, 0.0, [1, 2], [7, 8], [1, 1], [0.0] * 2)]
    rows = with_group_advantages(rows)
    # old log-probs computed by the model itself: exactly on-policy
    for r in rows:
        ids = r["prompt_ids"] + r["response_ids"]
        r["logprobs"] = [_ref_token_logprob(model, ids, len(r["prompt_ids"]) + k) if m else 0.0
                         for k, m in enumerate(r["loss_mask"])]
    samples = [grpo_sample(r, 64) for r in rows]
    batch = pad_samples(samples, task.collate_keys)
    loss, m = task.loss(model, batch)
    assert m["grpo/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["grpo/ratio_dev"] < 1e-5 and m["grpo/logprob_gap"] < 1e-5
    assert m["grpo/clip_frac"] == 0.0
    # at ratio 1 the surrogate is -token-mean of the advantages over policy tokens
    adv_tokens = [rows[0]["advantage"]] * 3 + [rows[1]["advantage"]] * 2
    assert float(loss.detach()) == pytest.approx(-sum(adv_tokens) / 5, abs=1e-5)
    loss.backward()
    assert model.emb.weight.grad is not None and model.emb.weight.grad.abs().sum() > 0


def test_grpo_seq_mean_weighs_each_trajectory_once():
    cfg = load_config(None, ["grpo.kl_coef=0.0", "grpo.loss_agg=seq_mean"])
    model = _TinyLM()
    task = GRPOTask(cfg)
    rows = with_group_advantages([_row("q", 0, 1.0, [1, 2], [3, 4, 5, 6], [1, 0, 1, 1], [0.0] * 4),
                                  _row("q", 1, 0.0, [1, 2], [7, 8], [1, 1], [0.0] * 2)])
    for r in rows:  # exactly on-policy: ρ = 1
        ids = r["prompt_ids"] + r["response_ids"]
        r["logprobs"] = [_ref_token_logprob(model, ids, len(r["prompt_ids"]) + k) if m else 0.0
                         for k, m in enumerate(r["loss_mask"])]
    samples = [grpo_sample(r, 64) for r in rows]
    assert [task.sample_weight(s) for s in samples] == [1.0, 1.0]
    loss, m = task.loss(model, pad_samples(samples, task.collate_keys))
    # 1/B Σ_i mean_t(-A_i) = -(A_0 + A_1) / 2 = 0 for a 1-vs-0 group (3 vs 2 tokens would not cancel)
    assert float(loss.detach()) == pytest.approx(-(rows[0]["advantage"] + rows[1]["advantage"]) / 2, abs=1e-5)
    assert m["grpo/logprob_gap"] < 1e-5 and m["grpo/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    token = GRPOTask(load_config(None, ["grpo.kl_coef=0.0"]))
    assert [token.sample_weight(s) for s in samples] == [3.0, 2.0]
    tok_loss, _ = token.loss(model, pad_samples(samples, token.collate_keys))
    assert float(tok_loss.detach()) == pytest.approx(-(3 * rows[0]["advantage"] + 2 * rows[1]["advantage"]) / 5,
                                                     abs=1e-5)


def test_grpo_reference_kl_and_logprob_gap():
    cfg = load_config(None, ["grpo.kl_coef=0.5"])
    model = _TinyLM()
    task = GRPOTask(cfg)
    task.prepare_model(model, cfg)
    assert task.reference is not None and not any(p.requires_grad for p in task.reference.parameters())
    with torch.no_grad():
        model.emb.weight.add_(0.3 * torch.randn_like(model.emb.weight))  # policy drifts from ref
    row = with_group_advantages([_row("q", 0, 1.0, [1], [2, 3], [1, 1], [-1.0, -2.0]),
                                 _row("q", 1, 0.0, [1], [4], [1], [-3.0])])
    samples = [grpo_sample(r, 16) for r in row]
    _, m = task.loss(model, pad_samples(samples, task.collate_keys))
    lp = [[_ref_token_logprob(model, s["input_ids"].tolist(), t) for t in range(1, len(s["input_ids"]))]
          for s in samples]
    gaps = [abs(lp[0][0] + 1.0), abs(lp[0][1] + 2.0), abs(lp[1][0] + 3.0)]
    assert m["grpo/logprob_gap"] == pytest.approx(sum(gaps) / 3, rel=1e-4)
    assert m["grpo/kl"] > 0


def test_grpo_mini_batches_updates_per_step_and_warmup_ratio():
    """Search-R1's shape: 512 prompts x G=5 = 2,560 sequences, mini-batch 256 -> 10 updates per
    step; 1 epoch; warm-up over 0.285 of the round's updates; more than one update -> recompute."""
    cfg = load_config(None, ["grpo.questions_per_step=512", "rollout.group_size=5", "grpo.mini_batch_size=256",
                             "grpo.steps_per_round=1005", "grpo.warmup_ratio=0.285", "grpo.weight_decay=0.01"])
    task = GRPOTask(cfg)
    batch = [{"input_ids": [0] * 3, "loss_mask": [0, 1, 1]} for _ in range(2560)]
    assert [len(m) for m in task.minibatches(batch)] == [256] * 10
    assert task.updates_per_step(2560) == 10
    assert task.warmup_steps == math.ceil(0.285 * 1005 * 10)
    assert task.weight_decay == 0.01 and task.recompute_old
    assert "engine_logprobs" in task.collate_keys
    # a short step (groups with equal rewards dropped) still splits, the last minibatch short
    assert [len(m) for m in task.minibatches(batch[:600])] == [256, 256, 88]
    two = GRPOTask(load_config(None, ["grpo.questions_per_step=4", "grpo.mini_batch_size=8", "grpo.ppo_epochs=2"]))
    assert two.updates_per_step(20) == 2 * 3
    # one update per step: the engine's log-probs are pi_old (no extra forward), unless asked
    one = load_config(None, ["grpo.questions_per_step=4"])
    assert not GRPOTask(one).recompute_old and GRPOTask(one).updates_per_step(20) == 1
    assert GRPOTask(load_config(None, ["grpo.old_logprobs=recompute"])).recompute_old
    assert not GRPOTask(load_config(None, ["grpo.mini_batch_size=8", "grpo.old_logprobs=engine"])).recompute_old


@pytest.mark.parametrize("n,world,micro", [(7, 2, 2), (5, 1, 2), (3, 2, 4), (8, 2, 1)])
def test_rank_micro_batches_cover_each_row_once_in_equal_counts(n, world, micro):
    mb = [{"input_ids": [0] * (1 + (i * 5) % 7)} for i in range(n)]
    plans = [rank_micro_batches(mb, r, world, micro) for r in range(world)]
    assert len({len(p) for p in plans}) == 1                      # every rank runs as many
    seen = sorted(i for p in plans for m in p if m is not None for i in m)
    assert seen == list(range(n))
    assert all(len(m) <= micro for p in plans for m in p if m is not None)


class _TinyLlama:
    @staticmethod
    def make(seed=0):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=1))


def test_recomputed_old_logprobs_give_ratio_one_on_the_first_minibatch():
    """pi_old = the weights that generated the batch: after recompute_old_logprobs the first
    minibatch is exactly on-policy (ratio 1) while the engine gap is still reported; after one
    update the second minibatch's ratio moves off 1 (pi_old stayed the pre-update policy)."""
    cfg = load_config(None, ["grpo.kl_coef=0.0", "grpo.mini_batch_size=4", "grpo.questions_per_step=2",
                             "rollout.group_size=4", "train.micro_batch_size=2"])
    model = _TinyLlama.make()
    task = GRPOTask(cfg)
    assert task.recompute_old
    rng = np.random.default_rng(0)
    rows = []
    for q in range(2):
        for i in range(4):
            n = int(rng.integers(2, 6))
            rows.append(_row(f"q{q}", i, float(i % 2), [1, 2, 3], rng.integers(4, 31, n).tolist(),
                             [1] * n, (-2.0 + 0.1 * rng.random(n)).tolist()))  # "engine" log-probs
    samples = [grpo_sample(r, 64) for r in with_group_advantages(rows)]
    batch = task.recompute_old_logprobs(model, samples, rank=0, world=1, micro_batch_size=2)
    assert all("engine_logprobs" in s for s in batch) and "engine_logprobs" not in samples[0]
    first, second = task.minibatches(batch)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    gaps = []
    for idx in rank_micro_batches(first, 0, 1, 2):
        loss, m = task.loss(model, pad_samples([first[i] for i in idx], task.collate_keys))
        assert m["grpo/ratio_dev"] < 1e-6 and m["grpo/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        gaps.append(m["grpo/logprob_gap"])
        loss.backward()
    assert min(gaps) > 0.1     # trainer vs the (made-up) engine log-probs: still measured
    opt.step()
    _, m = task.loss(model, pad_samples(second, task.collate_keys))
    assert m["grpo/ratio_dev"] > 1e-4
    # the engine's log-probs as pi_old: ratio off 1 from the start
    eng = GRPOTask(load_config(None, ["grpo.kl_coef=0.0", "grpo.old_logprobs=engine"]))
    _, m = eng.loss(_TinyLlama.make(), pad_samples(samples[:2], eng.collate_keys))
    assert m["grpo/ratio_dev"] > 0.1


def test_full_state_dict_drops_tied_and_casts():
    lin = torch.nn.Linear(3, 3)
    model = torch.nn.Module()
    model.a, model.b = lin, torch.nn.Linear(3, 3)
    model.b.weight = lin.weight  # tied
    sd = full_state_dict(model, dtype=torch.bfloat16)
    assert set(sd) == {"a.weight", "a.bias", "b.bias"}
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    # by default the trained dtype is kept: the engines serve exactly the trainer's weights
    sd = full_state_dict(model)
    assert all(t.dtype == torch.float32 for t in sd.values()) and torch.equal(sd["a.weight"], lin.weight)


def test_deepspeed_config_cpu_and_gpu():
    cfg = load_config(None, ["train.micro_batch_size=3", "train.num_workers=2", "train.bf16=true"])
    ds = deepspeed_config(cfg.train, grad_clip=0.7, world_size=2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    off = load_config(None, ["train.bf16=false"])
    assert deepspeed_config(off.train, grad_clip=1.0, world_size=2)["bf16"]["enabled"] is False
    assert ds["gradient_clipping"] == 0.7 and ds["train_batch_size"] == 6
    assert "optimizer" not in ds  # a torch.optim.AdamW object is passed instead (MEASURED)
    gpu = load_config(None, ["train.use_gpu=true", "train.bf16=false"])
    ds = deepspeed_config(gpu.train, grad_clip=1.0, world_size=8)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True


def test_masked_logprobs_head_on_loss_tokens_only_matches_full_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).float().eval()
    samples = [{"input_ids": np.array([1, 5, 7, 9, 11, 3]), "loss_mask": np.array([0, 0, 1, 1, 0, 1])},
               {"input_ids": np.array([2, 4, 6]), "loss_mask": np.array([0, 1, 1])}]
    b = pad_samples(samples, ["input_ids", "loss_mask"])
    fast = masked_logprobs(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    full = causal_logprobs(model, b["input_ids"], b["attention_mask"])
    expected = full[b["loss_mask"][:, 1:].bool()]
    assert fast.shape == (5,)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
