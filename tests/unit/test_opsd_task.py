"""OPSD task, pair rows and round logic on tiny stand-ins: collate alignment, the loss on a tiny
random Llama + LoRA against a per-sample reference, merged export, mining rows, best-checkpoint
selection and the batch schedule."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from searche1_ray.config import load_config
from searche1_ray.pairs import mine_group, pair_counts, policy_text
from searche1_ray.training.opsd_round import BestCheckpoint, batch_schedule, select_best
from searche1_ray.training.opsd_task import (
    OPSDTask,
    collate_pairs,
    make_sample,
    merged_state_dict,
    opsd_loss,
    teacher_user_message,
)
from searche1_ray.trajectory import INSTRUCTION

# ------------------------------------------------------------------------------- collate

SAMPLES = [
    # student prompt 3 tokens, teacher prompt 6, response 4 with a retrieved token at j=2
    {"student_prompt_ids": [1, 2, 3], "teacher_prompt_ids": [1, 9, 9, 9, 9, 3],
     "response_ids": [40, 41, 42, 43], "loss_mask": [1, 1, 0, 1]},
    # longer student prompt, shorter response
    {"student_prompt_ids": [1, 5, 5, 5, 3], "teacher_prompt_ids": [1, 8, 3],
     "response_ids": [50, 51], "loss_mask": [0, 1]},
]


def test_collate_positions_predict_the_same_response_token_in_both_inputs():
    b = collate_pairs(SAMPLES, pad_id=0)
    assert b["student_positions"].shape == b["teacher_positions"].shape == b["loss_mask"].shape == (2, 4)
    for i, s in enumerate(SAMPLES):
        for j, tok in enumerate(s["response_ids"]):
            sp, tp = int(b["student_positions"][i, j]), int(b["teacher_positions"][i, j])
            # the hidden state at position p predicts the token at p + 1
            assert int(b["student_input_ids"][i, sp + 1]) == tok
            assert int(b["teacher_input_ids"][i, tp + 1]) == tok
            assert sp == len(s["student_prompt_ids"]) - 1 + j
            assert tp == len(s["teacher_prompt_ids"]) - 1 + j
            assert b["loss_mask"][i, j] == s["loss_mask"][j]
        # padding: masked out, and every position index stays inside the real tokens
        assert b["loss_mask"][i, len(s["response_ids"]):].sum() == 0
        n_s = len(s["student_prompt_ids"]) + len(s["response_ids"])
        n_t = len(s["teacher_prompt_ids"]) + len(s["response_ids"])
        assert int(b["student_attention_mask"][i].sum()) == n_s
        assert int(b["teacher_attention_mask"][i].sum()) == n_t
        assert int(b["student_positions"][i].max()) < n_s and int(b["teacher_positions"][i].max()) < n_t
    assert b["student_input_ids"][1, 7:].tolist() == []  # width = longest student input (7)
    assert b["teacher_input_ids"].shape == (2, 10)
    assert b["teacher_input_ids"][1, 5:].tolist() == [0] * 5


def test_collate_rejects_misaligned_mask():
    bad = dict(SAMPLES[0], loss_mask=[1, 1])
    with pytest.raises(ValueError, match="sample 0 has 4 response ids but 2 loss_mask"):
        collate_pairs([bad])


# ------------------------------------------------------------------ tiny model + LoRA loss


def _cfg(**over):
    sets = [f"opsd.{k}={v}" for k, v in over.items()]
    return load_config(None, ["opsd.target_modules=[q_proj,v_proj,up_proj]", "opsd.lora_r=4",
                              "opsd.lora_alpha=8", *sets])


def _tiny_peft(cfg, seed=0):
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True))
    pm = OPSDTask(cfg).prepare_model(base, cfg)
    for n, p in pm.named_parameters():  # a non-trivial adapter (B = 0 at init)
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    return pm


def _reference_loss(pm, samples, tau):
    """Per sample, unpadded, from full logits: teacher = adapter disabled on its own input."""
    total, count = 0.0, 0
    for s in samples:
        resp = torch.tensor(s["response_ids"])
        s_in = torch.tensor([s["student_prompt_ids"] + s["response_ids"]])
        t_in = torch.tensor([s["teacher_prompt_ids"] + s["response_ids"]])
        with torch.no_grad():
            s_logits = pm(input_ids=s_in).logits[0]
            with pm.disable_adapter():
                t_logits = pm(input_ids=t_in).logits[0]
        ls, lt = len(s["student_prompt_ids"]), len(s["teacher_prompt_ids"])
        for j in range(len(resp)):
            if not s["loss_mask"][j]:
                continue
            log_ps = torch.log_softmax(s_logits[ls - 1 + j], -1)
            log_pt = torch.log_softmax(t_logits[lt - 1 + j], -1)
            total += float(torch.clamp(log_pt.exp() * (log_pt - log_ps), max=tau).sum())
            count += 1
    return total / count


@pytest.mark.parametrize("lean", [True, False])
def test_opsd_loss_matches_per_sample_reference(lean):
    cfg = _cfg()
    pm = _tiny_peft(cfg)
    batch = collate_pairs(SAMPLES)
    loss, m = opsd_loss(pm, batch, tau_clip=10.0, lean=lean)
    loss = loss.detach()
    assert float(loss) == pytest.approx(_reference_loss(pm, SAMPLES, 10.0), rel=1e-5, abs=1e-6)
    assert m["opsd/kl"] == pytest.approx(float(loss))
    assert 0.0 <= m["opsd/clip_frac"] <= 1.0
    # a tiny clip bites and is reported
    loss_c, m_c = opsd_loss(pm, batch, tau_clip=1e-4, lean=lean)
    assert float(loss_c.detach()) == pytest.approx(_reference_loss(pm, SAMPLES, 1e-4), rel=1e-5)
    assert m_c["opsd/clip_frac"] > 0


def test_lean_and_direct_give_the_same_adapter_gradients_and_none_to_the_base():
    cfg = _cfg()
    pm = _tiny_peft(cfg)
    batch = collate_pairs(SAMPLES)
    grads = []
    for lean in (True, False):
        pm.zero_grad(set_to_none=True)
        opsd_loss(pm, batch, 10.0, lean)[0].backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert grads[0] and all("lora_" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_teacher_pass_is_the_base_model():
    cfg = _cfg()
    pm = _tiny_peft(cfg)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        with pm.disable_adapter():
            t = pm(input_ids=x).logits
        s = pm(input_ids=x).logits
        base = pm.get_base_model()
        sd = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if ".lora_" not in k}
        plain = LlamaForCausalLM(base.config)
        plain.load_state_dict(sd)
        ref = plain(input_ids=x).logits
    torch.testing.assert_close(t, ref, rtol=0, atol=0)
    assert (s - t).abs().max() > 1e-3


def test_merged_state_dict_reproduces_the_adapter_and_leaves_the_model_alone():
    cfg = _cfg()
    pm = _tiny_peft(cfg)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    sd = merged_state_dict(pm, dtype=torch.float32)
    assert "lm_head.weight" not in sd  # tied to the embedding, dropped as save_pretrained does
    assert not any("lora_" in k or "base_layer" in k for k in sd)
    plain = LlamaForCausalLM(pm.get_base_model().config)
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    plain.tie_weights()
    x = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, pm(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    for k, v in pm.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------ samples (char tokenizer)


class CharTokenizer:
    """Stand-in tokenizer: one id per character (ord), no chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _pair(question="Who built the Iron Gate", refs=("<search> gate </search><answer> Tom </answer>",),
          response_len=40, mask=None):
    mask = mask if mask is not None else [1] * response_len
    return {"question_id": "q7", "question": question, "prompt_ids": [7] * 12,
            "response_ids": list(range(100, 100 + response_len)), "loss_mask": mask,
            "reference_texts": list(refs), "reference_responses": list(refs)}


def test_make_sample_builds_the_teacher_prompt_from_the_template():
    cfg = load_config(None, ["model.use_chat_template=false"])
    s = make_sample(_pair(), CharTokenizer(), cfg)
    text = CharTokenizer().decode(s["teacher_prompt_ids"])
    assert text.startswith(INSTRUCTION + " Question: Who built the Iron Gate?\n")
    assert "<search> gate </search><answer> Tom </answer>" in text
    assert s["student_prompt_ids"] == [7] * 12
    assert s["input_ids"] == s["student_prompt_ids"] + s["response_ids"]
    assert s["response_ids"] == list(range(100, 140)) and s["loss_mask"] == [1] * 40


def test_make_sample_cuts_response_then_reference_to_fit():
    cfg = load_config(None, ["model.use_chat_template=false", "train.max_seq_len=900"])
    tok = CharTokenizer()
    prompt_len = len(make_sample(_pair(response_len=1), tok, cfg)["teacher_prompt_ids"])
    s = make_sample(_pair(response_len=2000), tok, cfg)
    assert len(s["teacher_prompt_ids"]) == prompt_len
    # the student input (trained through) fills max_seq_len; the response is cut to fit it
    assert len(s["student_prompt_ids"]) + len(s["response_ids"]) == 900
    assert s["response_ids"] == list(range(100, 100 + 900 - 12))
    # a reference too long for the budget is shortened; the teacher input (no gradient) may run
    # past max_seq_len, to 2x at most, so the whole response is kept
    s = make_sample(_pair(refs=("x" * 5000,), response_len=50), tok, cfg)
    assert len(s["teacher_prompt_ids"]) <= 900 - 8
    assert s["response_ids"] == list(range(100, 150))
    assert "x" * 100 in tok.decode(s["teacher_prompt_ids"])
    s = make_sample(_pair(refs=("x" * 5000,), response_len=2000), tok, cfg)
    assert len(s["teacher_prompt_ids"]) + len(s["response_ids"]) <= 2 * 900
    assert len(s["student_prompt_ids"]) + len(s["response_ids"]) <= 900
    # nothing the policy wrote survives the cut -> no sample
    assert make_sample(_pair(response_len=2000, mask=[0] * 1000 + [1] * 1000), tok, cfg) is None


def test_teacher_context_holds_the_whole_reference_information_included():
    """Eq. 4: the teacher reads instruction ‖ question ‖ τ_ref whole, its <information> too
    (opsd.teacher_reference: full, the default); policy_text leaves the retrieved blocks out."""
    rows = [_row(0, 1.0, "<search> iron gate </search>" + INFO + "<answer> A </answer>", 1),
            _row(1, 0.0, "<think>no idea</think><answer> B </answer>", 0)]
    pair = mine_group(rows)
    assert pair["status"] == "pair" and pair["reference_sample_idxs"] == [0]
    assert "<information>" in pair["reference_responses"][0]
    tok = CharTokenizer()
    full_cfg = load_config(None, ["model.use_chat_template=false", "train.max_seq_len=2048"])
    assert full_cfg.opsd.teacher_reference == "full"
    teacher = tok.decode(make_sample(pair, tok, full_cfg)["teacher_prompt_ids"])
    assert "<information>Doc 1(Title: X) a very long retrieved passage " + "z" * 200 + "</information>" in teacher
    assert "<search> iron gate </search>" in teacher and "<answer> A </answer>" in teacher
    lean_cfg = load_config(None, ["model.use_chat_template=false", "train.max_seq_len=2048",
                                  "opsd.teacher_reference=policy_text"])
    teacher = tok.decode(make_sample(pair, tok, lean_cfg)["teacher_prompt_ids"])
    assert "Doc 1(Title: X)" not in teacher and "z" * 50 not in teacher
    assert "<search> iron gate </search>" in teacher and "<answer> A </answer>" in teacher
    # a prompt over budget is cut inside the retrieved text first: the search and answer stay
    tight = load_config(None, ["model.use_chat_template=false", "train.max_seq_len=960"])
    ids = make_sample(pair, tok, tight)["teacher_prompt_ids"]
    teacher = tok.decode(ids)
    assert len(ids) <= 960 - 8
    assert "<information>Doc 1(Title: X) a very long" in teacher and " …</information>" in teacher
    assert "z" * 200 not in teacher
    assert "<search> iron gate </search>" in teacher and "<answer> A </answer>" in teacher
    # pairs mined before the column existed: a clear error naming the way out
    old = {k: v for k, v in pair.items() if k != "reference_responses"}
    with pytest.raises(KeyError, match="teacher_reference=policy_text"):
        make_sample(old, tok, full_cfg)


@pytest.mark.parametrize("lean", [True, False])
def test_opsd_loss_seq_mean_is_the_mean_of_per_trajectory_means(lean):
    """Eq. 7 as the paper writes it: 1/|B| Σ_τ 1/|R_τ| Σ_{t∈R_τ} Σ_v min(…), against a loop."""
    cfg = _cfg()
    pm = _tiny_peft(cfg)
    batch = collate_pairs(SAMPLES)
    loss, _ = opsd_loss(pm, batch, tau_clip=10.0, lean=lean, agg="seq_mean")
    per_traj = [_reference_loss(pm, [s], 10.0) for s in SAMPLES]
    assert float(loss.detach()) == pytest.approx(sum(per_traj) / len(per_traj), rel=1e-4)  # float32 model
    # SAMPLES have 3 and 1 policy tokens: the token mean weighs the first 3:1, so they differ
    tok, _ = opsd_loss(pm, batch, tau_clip=10.0, lean=lean, agg="token_mean")
    assert float(tok.detach()) == pytest.approx(_reference_loss(pm, SAMPLES, 10.0), rel=1e-4)
    assert abs(float(tok.detach()) - float(loss.detach())) > 1e-3 * float(tok.detach())


def test_opsd_task_weighs_trajectories_by_the_loss_agg():
    s = {"loss_mask": [1, 1, 0, 1], "input_ids": [0] * 4}
    assert OPSDTask(_cfg()).sample_weight(s) == 1.0                      # seq_mean: the paper
    assert OPSDTask(_cfg(loss_agg="token_mean")).sample_weight(s) == 3.0
    assert OPSDTask(_cfg()).sample_weight({"loss_mask": [0, 0], "input_ids": [0, 0]}) == 0.0


def test_teacher_message_numbers_several_references_and_names_bad_placeholders():
    msg = teacher_user_message("Q", ["first", "second"], "{question}|{reference}")
    assert msg == "Q?|Reference 1:\nfirst\n\nReference 2:\nsecond"
    assert teacher_user_message("Q?", ["only"], "{reference}") == "only"
    with pytest.raises(ValueError, match="opsd.teacher_template has an unknown placeholder"):
        teacher_user_message("Q", ["r"], "{answer}")


# ------------------------------------------------------------------------------- mining rows


def _row(i, reward, response, searches=0):
    return {"question_id": "q1", "sample_idx": i, "question": "Q", "golden_answers": ["A"],
            "response": response, "prompt_ids": [1, 2], "response_ids": [10 + i] * 3,
            "loss_mask": [1, 0, 1], "num_searches": searches, "reward": reward}


INFO = "\n\n<information>Doc 1(Title: X) a very long retrieved passage " + "z" * 200 + "</information>\n\n"


def test_mine_group_compares_policy_text_and_carries_the_student_tokens():
    rows = [_row(0, 1.0, "<search> a </search>" + INFO + "<answer> A </answer>", 1),
            _row(1, 1.0, "<answer> A </answer>", 0),          # reference: fewest searches
            _row(2, 0.0, "<answer> B </answer>", 0),          # close to the reference
            _row(3, 0.0, "<think>long wrong thinking here</think><answer> C </answer>", 0)]
    out = mine_group(list(reversed(rows)), num_references=2)
    assert out["status"] == "pair" and out["student_kind"] == "incorrect"
    assert out["student_sample_idx"] == 3
    assert out["response_ids"] == [13, 13, 13] and out["loss_mask"] == [1, 0, 1]
    assert out["reference_sample_idxs"] == [1, 0]
    assert out["reference_texts"][1] == "<search> a </search>\n\n\n\n<answer> A </answer>"  # no <information>
    assert out["edit_distance"] > 0 and out["num_correct"] == 2 and out["num_rollouts"] == 4
    assert policy_text(rows[0]["response"]) == out["reference_texts"][1]


def test_mine_group_drop_reasons_and_counts():
    all_wrong = mine_group([_row(0, 0.0, "x"), _row(1, 0.0, "y")])
    single = mine_group([_row(0, 1.0, "x")])
    fallback = mine_group([_row(0, 1.0, "<answer> A </answer>"), _row(1, 1.0, "<think>hm</think><answer> A </answer>")])
    assert (all_wrong["status"], all_wrong["drop_reason"]) == ("dropped", "no_correct")
    assert (single["status"], single["drop_reason"]) == ("dropped", "no_student")
    assert fallback["student_kind"] == "correct_fallback" and fallback["student_sample_idx"] == 1
    assert pair_counts([all_wrong, single, fallback]) == {
        "questions": 3, "pairs": 1, "dropped": 2, "dropped_no_correct": 1, "dropped_no_student": 1,
        "incorrect_student": 0, "correct_fallback": 1}


# ------------------------------------------------------------------------------ round logic


def test_select_best_takes_the_highest_em_and_the_earliest_on_ties():
    evals = [{"step": 0, "em": 0.2}, {"step": 3, "em": 0.3}, {"step": 6, "em": 0.3}, {"step": 9, "em": 0.1}]
    assert select_best(evals)["step"] == 3
    assert select_best([{"step": 0, "em": 0.5}, {"step": 3, "em": 0.5}])["step"] == 0
    assert select_best([{"step": 0, "em": math.nan}, {"step": 3, "em": 0.0}])["step"] == 0
    with pytest.raises(ValueError):
        select_best([])


def test_best_checkpoint_keeps_only_the_best_folder_on_disk(tmp_path):
    saved = []

    def saver(step):
        def save():
            d = tmp_path / f"step{step}"
            d.mkdir()
            (d / "model.safetensors").write_text(str(step))
            saved.append(step)
            return str(d)
        return save

    best = BestCheckpoint()
    assert best.offer({"step": 0, "em": 0.2}, None)              # the starting policy: nothing written
    assert best.kept == {"step": 0, "em": 0.2, "folder": None}
    assert not best.offer({"step": 2, "em": 0.2}, saver(2))      # a tie is not an improvement
    assert best.offer({"step": 4, "em": 0.4}, saver(4))
    assert not best.offer({"step": 6, "em": 0.3}, saver(6))
    assert best.offer({"step": 8, "em": 0.5}, saver(8))
    assert not best.offer({"step": 10, "em": 0.1}, saver(10))
    assert saved == [4, 8]                                       # only improvements are saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step8"]  # the earlier best was deleted
    assert best.kept["step"] == 8 and best.kept["folder"] == str(tmp_path / "step8")
    assert [e["step"] for e in best.evals] == [0, 2, 4, 6, 8, 10]
    assert select_best(best.evals) is best.evals[4]


@pytest.mark.parametrize("n,size,steps", [(10, 4, 7), (3, 3, 5), (5, 8, 4), (1, 2, 3)])
def test_batch_schedule_epochs_without_repeats(n, size, steps):
    sched = batch_schedule(n, steps, size, seed=1)
    assert sched == batch_schedule(n, steps, size, seed=1)
    assert len(sched) == steps
    flat = [i for b in sched for i in b]
    for b in sched:
        assert len(b) == min(size, n) and len(set(b)) == len(b)
    # each full epoch visits every sample exactly once
    for e in range(len(flat) // n):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))


class _CountingPool:
    """Stand-in rollout pool for the stop test: the round must not get past its rollouts."""

    def __init__(self):
        self.generated = 0
        self.updates = 0

    def generate(self, questions, n, temperature=None):
        self.generated += len(questions) * n
        return [{"question_id": q["id"], "sample_idx": s, "reward": 0.0, "num_searches": 0,
                 "response": "<answer> x </answer>"} for q in questions for s in range(n)]

    def update_weights(self, *a, **k):
        self.updates += 1


def test_opsd_round_stops_after_its_rollouts_when_asked(tmp_path):
    from searche1_ray.config import load_config
    from searche1_ray.training.opsd_round import RoundStopped, run_opsd_round

    cfg = load_config(None, ["opsd.samples_per_question=2", "opsd.questions_per_round=3"])
    train = [{"id": f"q{i}", "question": f"who is {i}?", "golden_answers": [str(i)]} for i in range(5)]
    pool, asked = _CountingPool(), []
    with pytest.raises(RoundStopped):
        run_opsd_round(cfg, pool, "no-such-policy", train, [], tmp_path, version=1, progress=False,
                       should_stop=lambda: asked.append(1) or True)
    assert pool.generated == 6 and pool.updates == 0 and asked == [1]
    assert (tmp_path / "rollouts.parquet").is_file() and not (tmp_path / "pairs.parquet").exists()


@pytest.mark.parametrize("budget", [70, 90, 110, 130, 400, 2000])
def test_teacher_prompt_fits_every_budget_the_question_allows(budget):
    """The shortening loop never stalls: with several <information> blocks it cuts them, then the
    tails, and returns a prompt within the budget whenever the template and question fit."""
    from searche1_ray.training.opsd_task import teacher_prompt_ids

    cfg = load_config(None, ["model.use_chat_template=false", "opsd.teacher_template={question}|{reference}"])
    tok = CharTokenizer()
    ref = ("<search> a </search>" + INFO + "<search> b </search>" + INFO + "<answer> A </answer>")
    ids = teacher_prompt_ids("Who", [ref, ref], tok, cfg, max_tokens=budget)
    assert len(ids) <= budget
    text = tok.decode(ids)
    if budget >= len(ref) * 2 + 40:
        assert "z" * 200 in text                    # room enough: nothing cut
    elif budget >= 2 * len("<search> a </search>")+ 2 * len("<answer> A </answer>") + 140:
        assert "<answer> A </answer>" in text       # retrieved text gave way first


def test_padding_micro_batch_runs_on_the_shortest_row():
    from searche1_ray.training.tasks import shortest_row

    assert shortest_row([{"input_ids": [0] * 5}, {"input_ids": [0] * 2}, {"input_ids": [0] * 3}]) == 1


def test_make_sample_weighs_action_tokens_with_opsd_action_weight():
    tok = CharTokenizer()
    text = "<think>hm</think><search> gate </search>\n\n<information>x</information>\n\n<answer> Tom </answer>"
    ids = [ord(c) for c in text]
    info = text.index("\n\n<information>"), text.index("</information>\n\n") + len("</information>\n\n")
    mask = [0 if info[0] <= i < info[1] else 1 for i in range(len(ids))]
    pair = dict(_pair(), response_ids=ids, loss_mask=mask)
    plain = make_sample(pair, tok, load_config(None, ["model.use_chat_template=false"]))
    assert plain["loss_mask"] == mask                       # the paper: every policy token 1
    s = make_sample(pair, tok, load_config(None, ["model.use_chat_template=false",
                                                  "opsd.action_weight=4"]))
    weighted = {i for i, m in enumerate(s["loss_mask"]) if m == 4.0}
    # the non-blank characters of the query and of the answer, nothing else
    expect = {i for i, c in enumerate(text) if c.strip() and (
        text.index("<search>") + 8 <= i < text.index("</search>")
        or text.index("<answer>") + 8 <= i < text.index("</answer>"))}
    assert weighted == expect
    assert all(m == (0.0 if not mask[i] else 4.0 if i in expect else 1.0)
               for i, m in enumerate(s["loss_mask"]))
    with pytest.raises(ValueError, match="opsd.action_weight"):
        load_config(None, ["opsd.action_weight=0"])


# ------------------------------------------------------------------ ZeRO-3 partitioned head (simulated)


class _FakeGathered:
    """Stands in for ``deepspeed.zero.GatheredParameters`` over the simulated partitioning below:
    the full value is back in ``param.data`` inside the block, the empty placeholder after."""

    calls: list = []

    def __init__(self, params, modifier_rank=None):
        self.params = list(params)
        _FakeGathered.calls.append(([id(p) for p in self.params], modifier_rank))

    def __enter__(self):
        for p in self.params:
            p.data = p.ds_full

    def __exit__(self, *exc):
        for p in self.params:
            p.data = torch.empty(0, dtype=p.ds_full.dtype)


def test_lean_loss_gathers_a_zero3_partitioned_head(monkeypatch):
    """Under ZeRO-3 the frozen LM head's ``weight`` is an empty placeholder outside a module call
    (DeepSpeed keeps the rank's slice in ``ds_tensor``); the lean loss reads that matrix itself,
    so it must gather it: same loss and adapter gradients as with the full weight, the weight
    partitioned again afterwards, and only that parameter gathered (read-only)."""
    import sys
    import types

    cfg = _cfg()
    torch.manual_seed(0)  # an untied head: the decoder keeps its embedding whole here
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False))
    pm = OPSDTask(cfg).prepare_model(base, cfg)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    batch = collate_pairs(SAMPLES)
    expected, _ = opsd_loss(pm, batch, 10.0, lean=True)
    expected.backward()
    want = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.zero_grad(set_to_none=True)

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=_FakeGathered)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    _FakeGathered.calls = []
    head = pm.get_base_model().get_output_embeddings().weight
    head.ds_id, head.ds_full = 0, head.data
    head.data = torch.empty(0)
    try:
        loss, m = opsd_loss(pm, batch, 10.0, lean=True)
        assert head.numel() == 0  # partitioned again after the loss
        loss.backward()
    finally:
        head.data = head.ds_full
        del head.ds_id, head.ds_full
    assert _FakeGathered.calls == [([id(head)], None)]
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    got = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
    # a trainable partitioned head would need the gathered matrix in backward: refused by name
    head.ds_id = 0
    head.requires_grad_(True)
    try:
        with pytest.raises(NotImplementedError, match="frozen LM head"):
            opsd_loss(pm, batch, 10.0, lean=True)
    finally:
        del head.ds_id
        head.requires_grad_(False)


def test_full_parameters_gathers_only_partitioned_parameters(monkeypatch):
    """Below ZeRO-3 (no ``ds_id``) the block gathers nothing and imports no DeepSpeed."""
    import sys

    from searche1_ray.training.tasks import full_parameters

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # any import of it would raise
    plain = torch.nn.Linear(3, 2)
    with full_parameters(plain.parameters()):
        assert plain.weight.shape == (2, 3)
