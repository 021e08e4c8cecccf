"""GRPO: group-normalised advantages and the PPO-clip policy loss (paper Eq. 2, as in Search-R1).

For a question q the policy samples a group of G trajectories o_1..o_G with EM rewards r_i.
Every policy-written token of o_i gets the same advantage

    A_i = (r_i - mean(r)) / (std(r) + eps)          (std unbiased; G = 1 or equal r -> A_i = 0)

and the objective (Eq. 2) is maximised:

    J(θ) = E[ 1/|T| Σ_{(i,t) ∈ T} min( ρ_{i,t} A_i, clip(ρ_{i,t}, 1-ε, 1+ε) A_i ) ]
           - β · 1/|T| Σ_{(i,t) ∈ T} KL_k3(π_θ || π_ref)_{i,t}

    ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_old(o_{i,t} | q, o_{i,<t})
    KL_k3   = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1        ("low-variance" k3)

T is the set of tokens the policy wrote (mask 1) over the whole batch: retrieved <information>
tokens and padding are excluded. ``agg="token_mean"`` (the default, Search-R1/verl's
aggregation) averages over all of T at once, so every token weighs the same and a long
trajectory weighs more than a short one. ``agg="seq_mean"`` is Eq. 2 as the paper writes it,

    1/B Σ_i 1/|T_i| Σ_{t ∈ T_i} (…)        (B = trajectories with at least one token in T)

so every trajectory weighs the same. ``policy_loss`` returns -J (a loss to minimise). Imports
torch only.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def group_advantages(rewards: Tensor | Sequence[float], eps: float = 1e-6) -> Tensor:
    """(r - mean) / (std + eps) over the last dimension (one group = one row).

    ``rewards`` is ``[G]`` (or ``[..., G]`` for several groups at once); ``torch.std`` is the
    unbiased estimate. A group of size 1 or whose rewards are all equal gets zeros exactly.
    """
    r = torch.as_tensor(rewards)
    if not torch.is_floating_point(r):
        r = r.to(torch.get_default_dtype())
    if r.dim() == 0:
        raise ValueError("group_advantages: rewards must have a group dimension [G], got a scalar")
    if r.shape[-1] < 2:
        return torch.zeros_like(r)
    mean = r.mean(dim=-1, keepdim=True)
    std = r.std(dim=-1, keepdim=True)
    adv = (r - mean) / (std + eps)
    equal = (r == r[..., :1]).all(dim=-1, keepdim=True)
    return torch.where(equal, torch.zeros_like(adv), adv)


def token_logprobs(logits: Tensor, target_ids: Tensor) -> Tensor:
    """log softmax(logits)[target] per position: ``[B, T, V]``, ``[B, T]`` -> ``[B, T]`` (fp32+).

    The caller aligns the two: ``logits[:, t]`` must be the distribution that produced
    ``target_ids[:, t]`` (for a causal LM, ``logits[:, :-1]`` against ``input_ids[:, 1:]``).
    Half-precision logits are upcast to float32 before the softmax. Computed as
    ``logit[target] - logsumexp(logits)`` so no full log-softmax tensor is kept for backward.
    """
    if logits.shape[:-1] != target_ids.shape:
        raise ValueError(
            f"token_logprobs: logits {tuple(logits.shape)} do not match target_ids "
            f"{tuple(target_ids.shape)}; expected logits [B, T, V] and target_ids [B, T]"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    picked = logits.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _masked_mean(x: Tensor, mask: Tensor, count: Tensor) -> Tensor:
    return (x * mask).sum() / count


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    agg: str = "token_mean",
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip loss of Eq. 2 (negated): token-mean over all mask-1 tokens of the batch, or with
    ``agg="seq_mean"`` the mean over rows of each row's token-mean (rows without a mask-1 token
    left out). The metrics are aggregated the same way.

    Shapes: ``logprobs`` / ``old_logprobs`` / ``ref_logprobs`` / ``mask`` ``[B, T]``,
    ``advantages`` ``[B]`` (one per trajectory; ``[B, T]`` also accepted). Gradient flows into
    ``logprobs`` only. Masked positions are replaced by 0 before any arithmetic, so padding
    holding -inf or garbage cannot leak NaN. An all-masked batch gives a loss of exactly 0
    that still has a (zero) gradient.

    Returns ``(loss, metrics)`` with float metrics ``pg_loss`` (the clipped surrogate part),
    ``kl`` (masked mean k3 KL to the reference; 0 without ``ref_logprobs``), ``clip_frac``
    (share of tokens where the clipped branch is the active one) and ``ratio_mean``.
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"policy_loss: logprobs {tuple(logprobs.shape)}, old_logprobs "
            f"{tuple(old_logprobs.shape)} and mask {tuple(mask.shape)} must all be [B, T]"
        )
    if agg not in ("token_mean", "seq_mean"):
        raise ValueError(f"policy_loss: agg must be 'token_mean' or 'seq_mean', got {agg!r}")
    keep = mask.bool()
    m = keep.to(logprobs.dtype)
    if agg == "seq_mean":  # weight 1/|T_i| per token: Σ w·x / Σ w = 1/B Σ_i mean_i(x)
        m = m / m.sum(dim=-1, keepdim=True).clamp(min=1.0)
    count = m.sum().clamp(min=1.0)  # tokens, or for seq_mean the rows that have any

    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    if adv.shape[0] != logprobs.shape[0]:
        raise ValueError(
            f"policy_loss: advantages {tuple(advantages.shape)} must be [B] with "
            f"B={logprobs.shape[0]} (one per trajectory)"
        )

    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(keep, logprobs - old_logprobs.detach(), zero)
    ratio = torch.exp(log_ratio)
    surr = -adv * ratio
    surr_clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg = torch.maximum(surr, surr_clipped)
    pg_loss = _masked_mean(pg, m, count)
    loss = pg_loss

    with torch.no_grad():
        clip_frac = _masked_mean((surr_clipped > surr).to(m.dtype), m, count)
        ratio_mean = _masked_mean(ratio, m, count)

    kl_value = 0.0
    if ref_logprobs is not None:
        d = torch.where(keep, ref_logprobs.detach() - logprobs, zero)
        kl = _masked_mean(torch.exp(d) - d - 1.0, m, count)
        kl_value = float(kl.detach())
        if kl_coef:
            loss = loss + kl_coef * kl

    metrics = {
        "pg_loss": float(pg_loss.detach()),
        "kl": kl_value,
        "clip_frac": float(clip_frac),
        "ratio_mean": float(ratio_mean),
    }
    return loss, metrics


def updates_per_step(num_samples: int, mini_batch_size: int, epochs: int = 1) -> int:
    """Optimizer updates one step of ``num_samples`` sequences makes: ``epochs`` x its
    mini-batches of ``mini_batch_size`` (0 = the whole step is one mini-batch), as Search-R1/verl's
    ``ppo_mini_batch_size`` / ``ppo_epochs``."""
    size = mini_batch_size or max(1, num_samples)
    return epochs * max(1, math.ceil(num_samples / size))
