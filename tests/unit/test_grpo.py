"""GRPO advantages, PPO-clip loss and token log-probs against slow loop references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from searche1_ray.grpo import group_advantages, policy_loss, token_logprobs

# ----------------------------------------------------------------------------- group_advantages


def _ref_advantages(rewards, eps=1e-6):
    g = len(rewards)
    if g < 2 or len(set(rewards)) == 1:
        return [0.0] * g
    mean = sum(rewards) / g
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (g - 1))
    return [(r - mean) / (std + eps) for r in rewards]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0, 0.5, 0.25]), min_size=1, max_size=8))
def test_group_advantages_matches_reference(rewards):
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64))
    assert got.tolist() == pytest.approx(_ref_advantages(rewards), abs=1e-9)


def test_group_advantages_known_values():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    # mean 0.2, unbiased std sqrt(0.2) = 0.4472
    assert adv[0].item() == pytest.approx(0.8 / (math.sqrt(0.2) + 1e-6), rel=1e-6)
    assert adv[1].item() == pytest.approx(-0.2 / (math.sqrt(0.2) + 1e-6), rel=1e-6)
    assert adv.sum().item() == pytest.approx(0.0, abs=1e-6)


def test_group_advantages_equal_and_single():
    assert group_advantages(torch.tensor([1.0, 1.0, 1.0])).tolist() == [0.0, 0.0, 0.0]
    assert group_advantages(torch.tensor([0.1] * 5)).tolist() == [0.0] * 5
    assert group_advantages(torch.tensor([1.0])).tolist() == [0.0]
    assert group_advantages([0, 1]).dtype.is_floating_point


def test_group_advantages_batched_rows():
    r = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    got = group_advantages(r)
    assert torch.allclose(got[0], group_advantages(r[0]))
    assert got[1].tolist() == [0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- policy_loss


def _ref_policy_loss(logp, old, adv, mask, clip_eps, ref=None, kl_coef=0.0):
    """Per-token loop of Eq. 2 (negated), token-mean over masked tokens; returns a graph."""
    b, t = logp.shape
    pg_terms, kl_terms, clipped = [], [], 0
    for i in range(b):
        for j in range(t):
            if not mask[i][j]:
                continue
            ratio = torch.exp(logp[i, j] - old[i, j])  # grad flows through logp only
            a = float(adv[i])
            unclipped = ratio * a
            clipped_obj = min(max(ratio, torch.tensor(1 - clip_eps, dtype=ratio.dtype)),
                              torch.tensor(1 + clip_eps, dtype=ratio.dtype)) * a
            obj = torch.minimum(unclipped, clipped_obj)
            clipped += int(clipped_obj.item() < unclipped.item())
            pg_terms.append(-obj)
            if ref is not None:
                d = ref[i, j] - logp[i, j]
                kl_terms.append(torch.exp(d) - d - 1)
    n = len(pg_terms)
    if n == 0:
        return None, None, 0.0
    pg = sum(pg_terms) / n
    kl = sum(kl_terms) / n if kl_terms else torch.tensor(0.0)
    return pg + kl_coef * kl, kl, clipped / n


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 4), st.integers(1, 6), st.integers(0, 10_000),
    st.sampled_from([0.1, 0.2, 0.3]), st.sampled_from([0.0, 0.001, 0.5]),
)
def test_policy_loss_value_and_grad_match_loop(b, t, seed, clip_eps, kl_coef):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    ref = old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.3
    if not mask.any():
        mask[0, 0] = True
    loss, metrics = policy_loss(logp, old, adv, mask, clip_eps, ref_logprobs=ref, kl_coef=kl_coef)
    (grad,) = torch.autograd.grad(loss, logp)

    logp_ref = logp.detach().clone().requires_grad_()
    ref_loss, ref_kl, ref_clip = _ref_policy_loss(logp_ref, old, adv, mask, clip_eps, ref, kl_coef)
    (ref_grad,) = torch.autograd.grad(ref_loss, logp_ref)

    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-12)
    assert metrics["kl"] == pytest.approx(ref_kl.item(), abs=1e-12)
    assert metrics["clip_frac"] == pytest.approx(ref_clip, abs=1e-12)
    assert (grad[~mask] == 0).all()


def test_policy_loss_on_policy_is_minus_mean_advantage():
    # ratio = 1 everywhere: loss = -token-mean of A, no clipping, ratio_mean 1
    logp = torch.log(torch.full((2, 3), 0.5)).requires_grad_()
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, m = policy_loss(logp, logp.detach(), adv, mask)
    assert loss.item() == pytest.approx(-(1 + 1 - 0.5) / 3)
    assert m["clip_frac"] == 0.0 and m["ratio_mean"] == pytest.approx(1.0) and m["kl"] == 0.0
    assert m["pg_loss"] == pytest.approx(loss.item())
    assert set(m) >= {"clip_frac", "kl", "ratio_mean", "pg_loss"}
    assert all(isinstance(v, float) for v in m.values())


def test_policy_loss_clipping_kills_gradient():
    # A > 0 and ratio above 1+eps: clipped branch active, zero gradient on that token
    old = torch.zeros(1, 2)
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
    loss, m = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() == pytest.approx(-0.5)
    assert m["clip_frac"] == pytest.approx(0.5)


def test_policy_loss_all_masked_is_zero_with_gradient():
    logp = torch.full((2, 3), -float("inf")).requires_grad_()  # padding garbage
    old = torch.randn(2, 3)
    loss, m = policy_loss(logp, old, torch.tensor([1.0, -1.0]), torch.zeros(2, 3),
                          ref_logprobs=torch.randn(2, 3), kl_coef=0.1)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert logp.grad is not None and torch.equal(logp.grad, torch.zeros(2, 3))
    assert all(math.isfinite(v) for v in m.values())


def test_policy_loss_masked_garbage_does_not_leak():
    logp = torch.tensor([[-1.0, -float("inf")]], requires_grad=True)
    old = torch.tensor([[-1.2, float("nan")]])
    loss, _ = policy_loss(logp, old, torch.tensor([2.0]), torch.tensor([[1, 0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


def test_policy_loss_kl_zero_when_equal_to_ref():
    logp = torch.randn(2, 4).requires_grad_()
    _, m = policy_loss(logp, logp.detach(), torch.zeros(2), torch.ones(2, 4),
                       ref_logprobs=logp.detach(), kl_coef=1.0)
    assert m["kl"] == pytest.approx(0.0, abs=1e-7)


def test_policy_loss_shape_errors():
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 4))


# ----------------------------------------------------------------------------- token_logprobs


def test_token_logprobs_matches_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 4), generator=g)
    got = token_logprobs(logits, ids)
    for b in range(2):
        for t in range(4):
            row = logits[b, t].tolist()
            expect = row[ids[b, t]] - math.log(sum(math.exp(x) for x in row))
            assert got[b, t].item() == pytest.approx(expect, abs=1e-12)
    got.sum().backward()
    assert torch.allclose(logits.grad.sum(-1), torch.zeros(2, 4, dtype=torch.float64), atol=1e-12)


def test_token_logprobs_bf16_upcast_and_shape_error():
    logits = torch.randn(1, 3, 5).bfloat16()
    out = token_logprobs(logits, torch.tensor([[0, 1, 2]]))
    assert out.dtype == torch.float32 and (out <= 0).all()
    with pytest.raises(ValueError, match="target_ids"):
        token_logprobs(torch.randn(1, 3, 5), torch.zeros(1, 4, dtype=torch.long))


def _ref_seq_mean_loss(logp, old, adv, mask, clip_eps):
    """Eq. 2 as the paper writes it, by loops: 1/B Σ_i 1/|T_i| Σ_t -min(ρA, clip(ρ)A), rows with
    no mask-1 token left out."""
    per_row = []
    for i in range(logp.shape[0]):
        terms = []
        for j in range(logp.shape[1]):
            if mask[i][j]:
                ratio = torch.exp(logp[i, j] - old[i, j])
                a = float(adv[i])
                lo, hi = torch.tensor(1 - clip_eps, dtype=ratio.dtype), torch.tensor(1 + clip_eps, dtype=ratio.dtype)
                terms.append(-torch.minimum(ratio * a, torch.clamp(ratio, lo, hi) * a))
        if terms:
            per_row.append(sum(terms) / len(terms))
    return sum(per_row) / len(per_row)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 10_000), st.sampled_from([0.1, 0.2]))
def test_policy_loss_seq_mean_matches_loop(b, t, seed, clip_eps):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.3
    if not mask.any():
        mask[0, 0] = True
    loss, _ = policy_loss(logp, old, adv, mask, clip_eps, agg="seq_mean")
    (grad,) = torch.autograd.grad(loss, logp)
    logp_ref = logp.detach().clone().requires_grad_()
    ref_loss = _ref_seq_mean_loss(logp_ref, old, adv, mask, clip_eps)
    (ref_grad,) = torch.autograd.grad(ref_loss, logp_ref)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-12)


def test_seq_mean_and_token_mean_differ_by_length_weighting():
    # on-policy (ρ = 1): token_mean = -Σ_i |T_i| A_i / Σ_i |T_i|, seq_mean = -mean_i A_i
    old = torch.zeros(2, 4, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    tok, _ = policy_loss(old.clone(), old, adv, mask)
    seq, _ = policy_loss(old.clone(), old, adv, mask, agg="seq_mean")
    assert tok.item() == pytest.approx(-(4 - 1) / 5)
    assert seq.item() == pytest.approx(0.0)
    empty, _ = policy_loss(old.clone(), old, adv, torch.zeros_like(mask), agg="seq_mean")
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="agg"):
        policy_loss(old, old, adv, mask, agg="sum")
