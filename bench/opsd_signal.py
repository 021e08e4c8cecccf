"""Does the OPSD teacher know more than the student? Teacher-vs-student probabilities on mined pairs.

OPSD (Eq. 7) can only move the student where the teacher — the same weights, adapter off, shown
the reference trajectory in its prompt (Eq. 4) — predicts differently from the student, which
sees only the question. This bench measures that signal on an OPSD round's mined pairs, with the
policy the round started from (so the adapter is zero and teacher and student differ *only* by
the reference in the teacher's context):

  ref_query / ref_answer  the reference's own search-query tokens (inside <search>…</search>)
                          and answer tokens (inside <answer>…</answer>), scored after
                          P_T ‖ τ_ref[:j] (teacher) and after P_S ‖ τ_ref[:j] (student):
                          mean log-prob per token. The teacher has the whole reference in view,
                          so a teacher that can read its context copies it (log-prob near 0).
  gold_answer             the golden answer written where the *student* trajectory opens
                          <answer>: log P(" gold </answer>" | P ‖ student prefix ‖ "<answer>")
                          under the teacher and under the student — the correction OPSD is for.
  kl                      Σ_v P_T log(P_T / P_S) per policy-written token of the student
                          trajectory (the loss before clipping; the mean over the pairs' tokens)
                          and the share of it on the answer span.
  first thought           the student's policy tokens before its first query (nothing retrieved
                          yet): the share of the KL there, and the largest probability teacher
                          and student give the golden answer's first token at any of them.

Per pair and per question type, then the means. Last lines:
``teacher_minus_student_gold_answer_lp=`` (mean over pairs of the per-token log-prob gain the
teacher has on the golden answer) and ``teacher_minus_student_ref_answer_lp=``.

Measured (2026-12-07, AVX2 EPYC, fp32): the 10 pairs of the 2026-12-06 quick-look ablation's
lever run (``ablation-s8``, OPSD lr 1e-3, which did not raise dev EM), policy = its G arm:

    | type | pairs | ref query T / S | ref answer T / S | gold answer T / S | KL | KL on answer |
    | all        | 10 | -0.007 / -0.075 | -0.003 / -0.003 | -1.42 / -2.82 | 0.118 | 0.2 % |
    | single_hop |  6 | -0.006 / -0.031 | -0.004 / -0.003 | -0.76 / -0.76 | 0.114 | 0.2 % |
    | bridge     |  2 | -0.011 / -0.153 | -0.001 / -0.003 | -2.38 / -9.19 | 0.165 | 0.1 % |
    | comparison |  1 | -0.007 / -0.225 | -0.003 / -0.005 | -3.42 / -2.83 | 0.075 | 0.1 % |
    | two_hop    |  1 | -0.004 / -0.035 | -0.000 / -0.000 | -1.49 / -2.40 | 0.094 | 0.1 % |

The teacher does know more where it matters: on the golden answer after the student's own
(wrong) prefix it gains +1.40 nats per token over the student (6 of 10 pairs; on the two bridge
pairs +6.6 and +7.1), and it predicts the reference's queries better. But that correction carries 0.2 %
of the loss: 99.8 % of Σ_v P_T log(P_T/P_S) sits on the student's thinking and query text,
where the two prompts just make the model write differently. Eq. 7 averages over every policy
token, so a few steps move the style and leave the answers — what the report saw (KL 0.10 →
0.04, no greedy answer gained).

    python -m bench.opsd_signal --pairs runs/<ablation>/draw0/GpO-<key>/opsd/pairs.parquet \\
        --policy runs/<ablation>/draw0/G-<key>/policy --questions <world>/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", required=True, help="an OPSD round's pairs.parquet")
    p.add_argument("--policy", required=True, help="the policy the OPSD round started from (HF folder)")
    p.add_argument("--questions", default=None,
                   help="jsonl with the questions' metadata.type (for the per-type table)")
    p.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"),
                   help="teacher template / reference form / max_seq_len come from here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None, help="also write the per-pair figures here")
    return p.parse_args(argv)


def action_positions(tok, ids: list[int], kind: str) -> list[int]:
    """Indices of ``ids`` inside the content of their ``<search>`` (``kind="query"``) or
    ``<answer>`` spans: the rule ``opsd.action_weight`` applies in training (per-token decoding)."""
    from searche1_ray.trajectory import action_token_positions
    return action_token_positions([tok.decode([t]) for t in ids],
                                  ("search",) if kind == "query" else ("answer",))


def token_logprobs(model, prompt_ids: list[int], response_ids: list[int]):
    """(log-probs of each response token, the [R, V] log-distributions predicting them)."""
    import torch

    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    logp = torch.log_softmax(logits, -1)
    tok = torch.tensor(response_ids)
    return logp.gather(1, tok[:, None])[:, 0], logp


def _mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def pair_signal(pair: dict, model, tok, cfg) -> dict:
    from searche1_ray.training.opsd_task import (MIN_RESPONSE_TOKENS, teacher_prompt_ids,
                                                 teacher_references)

    refs = teacher_references(pair, cfg)
    p_t = teacher_prompt_ids(pair["question"], refs, tok, cfg,
                             max_tokens=cfg.train.max_seq_len - MIN_RESPONSE_TOKENS)
    p_s = [int(t) for t in pair["prompt_ids"]]
    out: dict = {"question_id": pair["question_id"], "student_kind": pair.get("student_kind"),
                 "student_reward": pair.get("student_reward"), "teacher_prompt_tokens": len(p_t)}
    # (1) the reference's own query / answer tokens under both contexts
    ref = str(pair["reference_responses"][0])
    ids = tok(ref, add_special_tokens=False)["input_ids"][:cfg.train.max_seq_len]
    lt, _ = token_logprobs(model, p_t, ids)
    ls, _ = token_logprobs(model, p_s, ids)
    for kind in ("query", "answer"):
        pos = action_positions(tok, ids, kind)
        out[f"ref_{kind}_teacher"] = _mean([float(lt[i]) for i in pos]) if pos else None
        out[f"ref_{kind}_student"] = _mean([float(ls[i]) for i in pos]) if pos else None
    # (2) the golden answer where the student opens <answer>
    student = tok.decode([int(t) for t in pair["response_ids"]], skip_special_tokens=True)
    cut = student.rfind("<answer>")
    gold = list(pair["golden_answers"])[0] if len(pair["golden_answers"]) else None
    if cut >= 0 and gold:
        prefix = tok(student[:cut + len("<answer>")], add_special_tokens=False)["input_ids"]
        target = tok(f" {gold} </answer>", add_special_tokens=False)["input_ids"]
        n_gold = len(tok(f" {gold}", add_special_tokens=False)["input_ids"])
        gt, _ = token_logprobs(model, p_t + prefix, target)
        gs, _ = token_logprobs(model, p_s + prefix, target)
        out["gold_answer_teacher"] = float(gt[:n_gold].mean())
        out["gold_answer_student"] = float(gs[:n_gold].mean())
        out["student_answer"] = student[cut + len("<answer>"):].split("</answer>")[0].strip()
    # (3) the loss's own signal on the student trajectory (unclipped forward KL per token)
    resp = [int(t) for t in pair["response_ids"]][:max(0, cfg.train.max_seq_len - len(p_s))]
    mask = [int(m) for m in pair["loss_mask"]][:len(resp)]
    _, dt = token_logprobs(model, p_t, resp)
    _, ds = token_logprobs(model, p_s, resp)
    kl = (dt.exp() * (dt - ds)).sum(-1)
    pol = [i for i, m in enumerate(mask) if m]
    out["kl_mean"] = float(kl[pol].mean()) if pol else None
    out["kl_max"] = float(kl[pol].max()) if pol else None
    ans = [i for i in action_positions(tok, resp, "answer") if mask[i]]
    out["kl_answer_share"] = float(kl[ans].sum() / kl[pol].sum()) if ans and pol else None
    # (4) the student's first thought (policy tokens before its first query): there the student has
    # retrieved nothing, while the teacher has read the reference. Its share of the KL, and how
    # much probability each puts on the golden answer's first token there (the leak: a teacher
    # that wants to name the answer before any search teaches the student to guess it)
    queries = action_positions(tok, resp, "query")
    first = [i for i in pol if i < queries[0]] if queries else []
    out["kl_first_thought_share"] = float(kl[first].sum() / kl[pol].sum()) if first and pol else None
    if first and gold:
        g0 = tok(f" {gold}", add_special_tokens=False)["input_ids"][0]
        g1 = tok(gold, add_special_tokens=False)["input_ids"][0]
        out["gold_first_thought_teacher"] = float(max(dt[first, g0].exp().max(), dt[first, g1].exp().max()))
        out["gold_first_thought_student"] = float(max(ds[first, g0].exp().max(), ds[first, g1].exp().max()))
    return out


def main(argv=None) -> dict:
    args = _parse(argv)
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from searche1_ray.config import load_config
    from searche1_ray.paired import question_types

    cfg = load_config(args.config, args.set)
    pairs_path = Path(args.pairs)
    if not pairs_path.is_file():
        raise SystemExit(f"opsd_signal: no pairs file at {pairs_path}")
    pairs = [p for p in pq.read_table(pairs_path).to_pylist() if p.get("reference_responses")]
    if not pairs:
        raise SystemExit(f"opsd_signal: {pairs_path} holds no mined pair with a reference")
    types = {}
    if args.questions:
        with open(args.questions) as f:
            types = question_types((json.loads(line) for line in f if line.strip()), default="")
    tok = AutoTokenizer.from_pretrained(args.policy)
    model = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32).eval()
    rows = []
    for i, pair in enumerate(pairs):
        r = pair_signal(pair, model, tok, cfg)
        r["type"] = types.get(str(pair["question_id"]), "")
        rows.append(r)
        print(f"[{i + 1}/{len(pairs)}] {r['question_id']} ({r['type']}, {r['student_kind']}): "
              f"ref answer lp T {r.get('ref_answer_teacher')} S {r.get('ref_answer_student')}; "
              f"gold lp T {r.get('gold_answer_teacher')} S {r.get('gold_answer_student')} "
              f"(student said {r.get('student_answer')!r}); KL {r['kl_mean']}", flush=True)
    keys = ["ref_query_teacher", "ref_query_student", "ref_answer_teacher", "ref_answer_student",
            "gold_answer_teacher", "gold_answer_student", "kl_mean", "kl_answer_share",
            "kl_first_thought_share", "gold_first_thought_teacher", "gold_first_thought_student"]
    groups = {"all": rows}
    for r in rows:
        groups.setdefault(r["type"] or "?", []).append(r)
    print(f"\n| type | pairs | " + " | ".join(keys) + " |\n|---|---:|" + "---:|" * len(keys))
    summary = {}
    for g, rs in groups.items():
        m = {k: _mean([r.get(k) for r in rs]) for k in keys}
        summary[g] = {"pairs": len(rs), **m}
        print(f"| {g} | {len(rs)} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    wins = [r for r in rows if r.get("gold_answer_teacher") is not None]
    better = sum(r["gold_answer_teacher"] > r["gold_answer_student"] for r in wins)
    print(f"\nteacher puts more probability on the golden answer than the student in {better} of "
          f"{len(wins)} pairs (mean per-token prob teacher "
          f"{_mean([math.exp(r['gold_answer_teacher']) for r in wins]):.3f}, student "
          f"{_mean([math.exp(r['gold_answer_student']) for r in wins]):.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"pairs": rows, "summary": summary}, indent=1))
    a = summary["all"]
    print(f"teacher_minus_student_ref_answer_lp={a['ref_answer_teacher'] - a['ref_answer_student']:.3f}")
    print(f"teacher_minus_student_gold_answer_lp={a['gold_answer_teacher'] - a['gold_answer_student']:.3f}")
    return {"pairs": rows, "summary": summary}


if __name__ == "__main__":
    main()
