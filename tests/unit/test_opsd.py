"""OPSD pair mining and the clipped forward KL (direct and lean) against slow references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from searche1_ray.opsd import (
    clipped_forward_kl,
    clipped_forward_kl_lean,
    mine_pair,
    mine_references,
)


def R(text, reward, searches):
    return {"text": text, "reward": reward, "num_searches": searches}


def _levenshtein(a, b):
    # textbook dynamic programme
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _ref_mine(rollouts):
    correct = [i for i, r in enumerate(rollouts) if r["reward"] == 1]
    if not correct:
        return None
    ref = correct[0]
    for i in correct[1:]:
        a, b = rollouts[i], rollouts[ref]
        if (a["num_searches"], len(a["text"])) < (b["num_searches"], len(b["text"])):
            ref = i
    for pool in ([i for i, r in enumerate(rollouts) if r["reward"] == 0],
                 [i for i in correct if i != ref]):
        best, best_d = None, -1
        for i in pool:
            d = _levenshtein(rollouts[i]["text"], rollouts[ref]["text"])
            if d > best_d:
                best, best_d = i, d
        if best is not None:
            return ref, best
    return None


# ----------------------------------------------------------------------------- mining


def test_mine_reference_fewest_searches_student_farthest_wrong():
    rs = [
        R("search search answer", 1, 2),
        R("answer", 1, 1),
        R("ans", 0, 1),            # distance 3 to "answer"
        R("completely different", 0, 3),  # farthest
    ]
    ref, student = mine_pair(rs)
    assert ref is rs[1] and student is rs[3]


def test_mine_search_tie_goes_to_shorter_text():
    rs = [R("long correct text", 1, 1), R("short", 1, 1), R("x", 0, 0)]
    ref, student = mine_pair(rs)
    assert ref is rs[1] and student is rs[2]


def test_mine_full_tie_goes_to_first():
    rs = [R("abc", 0, 0), R("aaa", 1, 1), R("bbb", 1, 1), R("xyz", 0, 2), R("qrs", 0, 2)]
    ref, student = mine_pair(rs)
    assert ref is rs[1]
    # "abc", "xyz", "qrs" all at distance 3 from "aaa" except "abc" (2): first of the 3s wins
    assert student is rs[3]


def test_mine_no_correct_and_single_rollout():
    assert mine_pair([R("a", 0, 0), R("b", 0, 1)]) is None
    assert mine_pair([R("a", 1, 0)]) is None
    assert mine_pair([]) is None
    assert mine_references([R("a", 1, 0)], 2) is None


def test_mine_all_correct_falls_back_to_farthest_other_correct():
    rs = [R("abcd", 1, 1), R("ab", 1, 0), R("abc", 1, 2)]
    ref, student = mine_pair(rs)
    assert ref is rs[1] and student is rs[0]  # distance 2 beats 1


def test_mine_identical_correct_texts_never_pick_reference_itself():
    rs = [R("same", 1, 1), R("same", 1, 1)]
    ref, student = mine_pair(rs)
    assert ref is rs[0] and student is rs[1]


def test_mine_float_and_bool_rewards_and_missing_field():
    rs = [R("a", 1.0, 0), R("bb", 0.0, 0), R("c", True, 1)]
    ref, student = mine_pair(rs)
    assert ref is rs[0] and student is rs[1]
    with pytest.raises(KeyError, match="num_searches"):
        mine_pair([{"text": "a", "reward": 1}])


_texts = st.text(alphabet="ab<>é ", max_size=8)
_rollouts = st.lists(
    st.builds(R, _texts, st.sampled_from([0, 1]), st.integers(0, 3)), max_size=6
)


@settings(max_examples=200, deadline=None)
@given(_rollouts)
def test_mine_matches_reference(rs):
    got = mine_pair(rs)
    expect = _ref_mine(rs)
    if expect is None:
        assert got is None
    else:
        assert got is not None
        assert got[0] is rs[expect[0]] and got[1] is rs[expect[1]]
        assert got[0] is not got[1]


@settings(max_examples=100, deadline=None)
@given(_rollouts, st.integers(1, 4))
def test_mine_references_extends_mine_pair(rs, k):
    got = mine_references(rs, k)
    pair = mine_pair(rs)
    if pair is None:
        assert got is None
        return
    refs, student = got
    assert refs[0] is pair[0] and student is pair[1]
    assert 1 <= len(refs) <= k
    assert all(r["reward"] == 1 for r in refs) and all(r is not student for r in refs)
    assert len({id(r) for r in refs}) == len(refs)
    keys = [(r["num_searches"], len(r["text"])) for r in refs]
    assert keys == sorted(keys)
    n_other_correct = sum(1 for r in rs if r["reward"] == 1 and r is not student) - 1
    assert len(refs) == 1 + min(k - 1, n_other_correct)


def test_mine_references_order_and_k_validation():
    rs = [R("c", 1, 2), R("a", 1, 0), R("bb", 1, 1), R("b", 1, 1), R("zzzzzz", 0, 0)]
    refs, student = mine_references(rs, 3)
    assert refs == [rs[1], rs[3], rs[2]] and student is rs[4]
    with pytest.raises(ValueError, match="num_references"):
        mine_references(rs, 0)


# ----------------------------------------------------------------------------- clipped forward KL


def _ref_kl(student_logits, teacher_logits, mask, tau):
    """Loop over positions and vocabulary; teacher treated as a constant."""
    b, t, v = student_logits.shape
    total, count = 0.0, 0
    for i in range(b):
        for j in range(t):
            if not mask[i][j]:
                continue
            count += 1
            ls = torch.log_softmax(student_logits[i, j], -1)
            lt = torch.log_softmax(teacher_logits[i, j].detach(), -1)
            for k in range(v):
                total = total + torch.clamp(lt[k].exp() * (lt[k] - ls[k]), max=tau)
    if count == 0:
        return torch.zeros((), dtype=student_logits.dtype)
    return total / count


def _inputs(seed, b=2, t=3, v=6, h=4, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(b, t, h, generator=g, dtype=dtype)
    ht = torch.randn(b, t, h, generator=g, dtype=dtype)
    w = torch.randn(v, h, generator=g, dtype=dtype) * scale
    mask = torch.rand(b, t, generator=g) > 0.3
    return hs, ht, w, mask


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([10.0, 0.5, 0.05]))
def test_direct_kl_value_and_grad_match_loop(seed, tau):
    _, _, _, mask = _inputs(seed)
    g = torch.Generator().manual_seed(seed + 1)
    s = (torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = (torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    loss = clipped_forward_kl(s, t, mask, tau)
    gs, = torch.autograd.grad(loss, s)
    s2 = s.detach().clone().requires_grad_()
    ref = _ref_kl(s2, t, mask, tau)
    if ref.requires_grad:
        gs_ref, = torch.autograd.grad(ref, s2)
    else:
        gs_ref = torch.zeros_like(s2)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    assert torch.allclose(gs, gs_ref, atol=1e-12)
    # teacher gets nothing
    assert torch.autograd.grad(loss, t, allow_unused=True)[0] is None
    assert not clipped_forward_kl(s.detach(), t, mask, tau).requires_grad


def test_direct_kl_zero_for_equal_logits_and_positive_otherwise():
    s = torch.randn(2, 4, 9)
    mask = torch.ones(2, 4)
    assert clipped_forward_kl(s, s.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    assert clipped_forward_kl(s, torch.randn(2, 4, 9), mask).item() > 0


def test_direct_kl_clip_stats():
    # teacher one-hot-ish on token 0, student puts ~0 mass there: that term is huge, clipped
    v = 5
    teacher = torch.full((1, 1, v), -30.0)
    teacher[..., 0] = 30.0
    student = torch.zeros(1, 1, v)
    student[..., 0] = -30.0
    loss, stats = clipped_forward_kl(student, teacher, torch.ones(1, 1), tau_clip=1.0,
                                     return_stats=True)
    assert stats["clip_frac"] == pytest.approx(1 / v)
    assert stats["kl_unclipped"] > 30 and loss.item() < 1.0 + 1e-3
    unclipped = clipped_forward_kl(student, teacher, torch.ones(1, 1), tau_clip=1e9)
    assert unclipped.item() == pytest.approx(stats["kl_unclipped"], rel=1e-6)


def test_direct_kl_all_masked_is_zero_with_gradient():
    s = torch.randn(2, 3, 5, requires_grad=True)
    loss, stats = clipped_forward_kl(s, torch.randn(2, 3, 5), torch.zeros(2, 3), return_stats=True)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert stats["clip_frac"] == 0.0


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([10.0, 1.0, 0.02]), st.integers(1, 7))
def test_lean_matches_direct_value_and_grads(seed, tau, chunk):
    hs, ht, w, mask = _inputs(seed, b=2, t=4, v=11, h=5)
    hs.requires_grad_()
    w.requires_grad_()
    ht.requires_grad_()
    direct, dstats = clipped_forward_kl(hs @ w.T, ht @ w.T, mask, tau, return_stats=True)
    g_direct = torch.autograd.grad(direct, [hs, w])
    lean, lstats = clipped_forward_kl_lean(hs, ht, w, mask, tau, chunk_size=chunk,
                                           return_stats=True)
    g_lean = torch.autograd.grad(lean, [hs, w])
    assert lean.item() == pytest.approx(direct.item(), abs=1e-12)
    for a, b in zip(g_lean, g_direct):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
    assert lstats["clip_frac"] == pytest.approx(dstats["clip_frac"], abs=1e-12)
    assert lstats["kl_unclipped"] == pytest.approx(dstats["kl_unclipped"], abs=1e-10)
    # teacher side gets no gradient
    assert torch.autograd.grad(lean, ht, allow_unused=True)[0] is None


def test_lean_scaled_and_combined_backward():
    hs, ht, w, mask = _inputs(3, v=9)
    hs.requires_grad_()
    w.requires_grad_()
    extra = (hs ** 2).sum()
    total = 0.3 * clipped_forward_kl_lean(hs, ht, w, mask, chunk_size=2) + extra
    total.backward()
    g_lean = (hs.grad.clone(), w.grad.clone())
    hs.grad = None
    w.grad = None
    (0.3 * clipped_forward_kl(hs @ w.T, ht @ w.T, mask) + (hs ** 2).sum()).backward()
    assert torch.allclose(g_lean[0], hs.grad, atol=1e-12)
    assert torch.allclose(g_lean[1], w.grad, atol=1e-12)


def test_lean_all_masked_and_frozen_head_and_no_grad():
    hs, ht, w, _ = _inputs(5)
    hs.requires_grad_()
    loss = clipped_forward_kl_lean(hs, ht, w, torch.zeros(2, 3))
    assert loss.item() == 0.0 and math.isfinite(loss.item())
    loss.backward()
    assert torch.equal(hs.grad, torch.zeros_like(hs))
    # frozen LM head (LoRA): only the hidden states get a gradient
    hs.grad = None
    mask = torch.ones(2, 3)
    clipped_forward_kl_lean(hs, ht, w, mask).backward()
    hs2 = hs.detach().clone().requires_grad_()
    clipped_forward_kl(hs2 @ w.T, ht @ w.T, mask).backward()
    assert w.grad is None and torch.allclose(hs.grad, hs2.grad, atol=1e-12)
    with torch.no_grad():
        v = clipped_forward_kl_lean(hs, ht, w, mask)
    assert not v.requires_grad


def test_lean_float32_close_to_direct_and_bf16_runs():
    hs, ht, w, mask = _inputs(7, b=2, t=8, v=64, h=16, dtype=torch.float32, scale=1.0)
    assert clipped_forward_kl_lean(hs, ht, w, mask, chunk_size=3).item() == pytest.approx(
        clipped_forward_kl(hs @ w.T, ht @ w.T, mask).item(), rel=1e-5)
    hb = hs.bfloat16().requires_grad_()
    wb = w.bfloat16().requires_grad_()
    loss = clipped_forward_kl_lean(hb, ht.bfloat16(), wb, mask)
    loss.backward()
    assert loss.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16
    assert torch.isfinite(wb.grad.float()).all()


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="mask"):
        clipped_forward_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="lm_head_weight"):
        clipped_forward_kl_lean(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(3, 5),
                                torch.ones(1, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        clipped_forward_kl_lean(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(3, 4),
                                torch.ones(1, 2), chunk_size=0)


def test_lean_second_backward_raises_clearly():
    hs, ht, w, mask = _inputs(11)
    hs.requires_grad_()
    loss = clipped_forward_kl_lean(hs, ht, w, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="recompute the loss"):
        loss.backward()


# ----------------------------------------------------------------- Eq. 7 per trajectory (seq_mean)


def _ref_kl_seq(student_logits, teacher_logits, mask, tau):
    """The paper's form, slowly: each row's mean over its masked positions, then the mean over
    the rows that have any."""
    rows = [_ref_kl(student_logits[i:i + 1], teacher_logits[i:i + 1], mask[i:i + 1], tau)
            for i in range(student_logits.shape[0]) if mask[i].any()]
    if not rows:
        return torch.zeros((), dtype=student_logits.dtype)
    return sum(rows) / len(rows)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([10.0, 0.05]), st.sampled_from([1, 2, 64]))
def test_seq_mean_direct_and_lean_match_the_per_trajectory_loop(seed, tau, chunk):
    hs, ht, w, _ = _inputs(seed, b=3, t=4)
    g = torch.Generator().manual_seed(seed + 7)
    mask = torch.rand(3, 4, generator=g) > 0.4
    mask[seed % 3] = False                       # a row with no policy token is not counted
    mask[(seed + 1) % 3, 0] = True               # at least one row has one
    s_logits = (hs @ w.T).requires_grad_()
    ref = _ref_kl_seq(s_logits, ht @ w.T, mask, tau)
    loss = clipped_forward_kl(s_logits, ht @ w.T, mask, tau, agg="seq_mean")
    assert loss.item() == pytest.approx(ref.item(), abs=1e-10)
    g_direct, = torch.autograd.grad(loss, s_logits)
    g_ref, = torch.autograd.grad(ref, s_logits) if ref.requires_grad else (torch.zeros_like(s_logits),)
    assert torch.allclose(g_direct, g_ref, atol=1e-10)
    hs_l = hs.clone().requires_grad_()
    w_l = w.clone().requires_grad_()
    lean = clipped_forward_kl_lean(hs_l, ht, w_l, mask, tau, chunk_size=chunk, agg="seq_mean")
    assert lean.item() == pytest.approx(ref.item(), abs=1e-10)
    lean.backward()
    hs_d = hs.clone().requires_grad_()
    w_d = w.clone().requires_grad_()
    clipped_forward_kl(hs_d @ w_d.T, ht @ w.T, mask, tau, agg="seq_mean").backward()
    assert torch.allclose(hs_l.grad, hs_d.grad, atol=1e-10)
    assert torch.allclose(w_l.grad, w_d.grad, atol=1e-10)


def test_seq_mean_differs_from_token_mean_and_rejects_unknown_agg():
    s = torch.zeros(2, 3, 4, dtype=torch.float64)
    t = torch.zeros(2, 3, 4, dtype=torch.float64)
    t[0, :, 0] = 5.0                              # only row 0 disagrees with the student
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    tok = clipped_forward_kl(s, t, mask, agg="token_mean")
    seq = clipped_forward_kl(s, t, mask, agg="seq_mean")
    kl_row0 = clipped_forward_kl(s[:1], t[:1], mask[:1])
    assert tok.item() == pytest.approx(kl_row0.item() * 3 / 4)   # 3 of 4 tokens carry it
    assert seq.item() == pytest.approx(kl_row0.item() / 2)       # 1 of 2 trajectories
    with pytest.raises(ValueError, match="agg"):
        clipped_forward_kl(s, t, mask, agg="sum")


# ------------------------------------------------- weighted positions (opsd.action_weight)


def _ref_kl_weighted(student_logits, teacher_logits, weights, tau, agg):
    """Slowly: Σ_bt w_bt·KL_bt / Σ w (token_mean), or per row Σ_t w_bt·KL_bt / Σ_t w_bt, then the
    mean over rows with any weight (seq_mean)."""
    b, t, v = student_logits.shape

    def kl(i, j):
        ls = torch.log_softmax(student_logits[i, j], -1)
        lt = torch.log_softmax(teacher_logits[i, j].detach(), -1)
        return sum(torch.clamp(lt[k].exp() * (lt[k] - ls[k]), max=tau) for k in range(v))

    if agg == "token_mean":
        num = sum(weights[i][j] * kl(i, j) for i in range(b) for j in range(t) if weights[i][j])
        return num / sum(float(w) for row in weights for w in row)
    rows = [sum(weights[i][j] * kl(i, j) for j in range(t) if weights[i][j]) / float(sum(weights[i]))
            for i in range(b) if sum(weights[i]) > 0]
    return sum(rows) / len(rows)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["token_mean", "seq_mean"]), st.sampled_from([1, 3]))
def test_weighted_mask_direct_and_lean_match_the_weighted_loop(seed, agg, chunk):
    hs, ht, w, mask = _inputs(seed, b=3, t=4)
    mask[0, 0] = True
    weights = mask.to(torch.float64)
    weights[mask & (torch.arange(4) % 2 == 0)] = 5.0        # some policy tokens weigh 5
    s_logits = (hs @ w.T).requires_grad_()
    ref = _ref_kl_weighted(s_logits, ht @ w.T, weights.tolist(), 10.0, agg)
    loss = clipped_forward_kl(s_logits, ht @ w.T, weights, 10.0, agg=agg)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-10)
    assert torch.allclose(torch.autograd.grad(loss, s_logits)[0],
                          torch.autograd.grad(ref, s_logits)[0], atol=1e-10)
    lean = clipped_forward_kl_lean(hs, ht, w, weights, 10.0, chunk_size=chunk, agg=agg)
    assert lean.item() == pytest.approx(ref.item(), abs=1e-10)
    # all-ones weights are the binary mask exactly
    assert clipped_forward_kl(s_logits, ht @ w.T, mask.to(torch.float64), 10.0, agg=agg).item() == \
        pytest.approx(clipped_forward_kl(s_logits, ht @ w.T, mask, 10.0, agg=agg).item(), abs=1e-12)


def test_student_searches_rule_keeps_pairs_whose_student_searched_no_more_than_its_reference():
    from searche1_ray.config import load_config
    from searche1_ray.pairs import filter_by_searches

    pairs = [{"question_id": q, "student_num_searches": s, "reference_num_searches": [r]}
             for q, s, r in (("a", 2, 1), ("b", 1, 1), ("c", 1, 2), ("d", 3, 2))]
    assert filter_by_searches(pairs) == pairs                       # "any": the paper
    assert [p["question_id"] for p in filter_by_searches(pairs, "at_most_reference")] == ["b", "c"]
    with pytest.raises(ValueError, match="opsd.student_searches"):
        filter_by_searches(pairs, "fewer")
    assert load_config(None, ["opsd.student_searches=at_most_reference"]).opsd.student_searches == "at_most_reference"
    with pytest.raises(Exception, match="opsd.student_searches"):
        load_config(None, ["opsd.student_searches=fewer"])
