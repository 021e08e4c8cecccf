"""OPSD: mine (reference, student) pairs among sibling rollouts and the clipped forward-KL loss.

On-policy self-distillation (paper Eq. 3-7). For one question with rollouts o_1..o_G:

  (3) reference  o_ref = argmin_{o_i : r_i = 1} ( #searches(o_i), len(o_i), i )
      — the most efficient correct sibling (fewest searches, then shorter text, then first);
  (4) student    o_s   = argmax_{o_i : r_i = 0} Lev(o_i, o_ref)   (character edit distance),
      else argmax over the other correct siblings (never o_ref itself); no pair if no r_i = 1
      or no second rollout;
  (5) teacher    P_t(· | x, o_ref, o_s,<t)  = π_θ with the LoRA adapter disabled, the reference
      trajectory shown in its prompt (privileged context);
      student    P_s(· | x, o_s,<t)         = π_θ with the adapter on, the plain prompt;
  (6) per-token forward KL  KL_t = Σ_v P_t(v) (log P_t(v) − log P_s(v)), over the student's own
      policy-written tokens (mask 1);
  (7) clipped loss  L = 1/|M| Σ_{t ∈ M} Σ_v min( P_t(v) (log P_t(v) − log P_s(v)), τ_clip ),
      the teacher is a constant (no gradient), an empty M gives 0. That is the default
      ``agg="token_mean"`` (every masked token of the batch weighs the same). The paper writes
      (7) per trajectory: L = 1/|B| Σ_τ 1/|R_τ| Σ_{t ∈ R_τ} Σ_v min(…), ``agg="seq_mean"``
      (rows without a masked token are not counted in |B|).

``clipped_forward_kl`` computes (7) from full logits ``[B, T, V]``. ``clipped_forward_kl_lean``
computes the same value and gradient from hidden states and the LM-head weight, a chunk of
masked positions at a time, so ``[B, T, V]`` logits never exist (the gradient is computed in
the forward pass, chunk by chunk, and only scaled in the backward). Imports torch and rapidfuzz.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from rapidfuzz.distance import Levenshtein
from torch import Tensor
from torch.autograd.function import once_differentiable

# ----------------------------------------------------------------------------------------------
# pair mining (Eq. 3-4)


def _is_correct(rollout: dict[str, Any]) -> bool:
    return float(rollout["reward"]) > 0.5


def _reference_order(indexed: Sequence[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict]]:
    # fewest searches, then shorter text, then first in the group
    return sorted(indexed, key=lambda ir: (int(ir[1]["num_searches"]), len(str(ir[1]["text"])), ir[0]))


def _farthest(candidates: Sequence[tuple[int, dict[str, Any]]], reference_text: str) -> dict | None:
    best, best_dist = None, -1
    for _, r in candidates:  # in group order: ties keep the first
        dist = Levenshtein.distance(str(r["text"]), reference_text)
        if dist > best_dist:
            best, best_dist = r, dist
    return best


def _mine(rollouts: Sequence[dict[str, Any]]) -> tuple[list[tuple[int, dict]], dict] | None:
    for i, r in enumerate(rollouts):
        missing = [k for k in ("text", "reward", "num_searches") if k not in r]
        if missing:
            raise KeyError(f"opsd mining: rollout {i} lacks field(s) {missing}; each rollout dict "
                           "needs 'text', 'reward' (0/1) and 'num_searches'")
    indexed = list(enumerate(rollouts))
    correct = _reference_order([ir for ir in indexed if _is_correct(ir[1])])
    if not correct:
        return None
    ref_index, reference = correct[0]
    wrong = [ir for ir in indexed if not _is_correct(ir[1])]
    student = _farthest(wrong, str(reference["text"]))
    if student is None:
        others = [ir for ir in indexed if _is_correct(ir[1]) and ir[0] != ref_index]
        student = _farthest(others, str(reference["text"]))
    if student is None:
        return None
    return correct, student


def mine_pair(rollouts: Sequence[dict[str, Any]]) -> tuple[dict, dict] | None:
    """(reference, student) among the rollouts of one question, or None (Eq. 3-4).

    Each rollout dict needs ``text``, ``reward`` (0/1; > 0.5 counts as correct) and
    ``num_searches``. Reference: correct, fewest searches, ties -> shorter text -> first.
    Student: the incorrect rollout farthest (character Levenshtein distance) from the reference,
    else the farthest other correct one; ties -> first. None when nothing is correct or no
    rollout besides the reference exists. Returns the input dicts themselves.
    """
    mined = _mine(rollouts)
    if mined is None:
        return None
    correct, student = mined
    return correct[0][1], student


def mine_references(
    rollouts: Sequence[dict[str, Any]], k: int
) -> tuple[list[dict], dict] | None:
    """Like ``mine_pair`` but with up to ``k`` references (config ``opsd.num_references``).

    Returns ``(references, student)``: ``references[0]`` is ``mine_pair``'s reference, followed
    by up to k-1 further correct siblings in the same order (fewest searches, shorter, first),
    never including the student. The student is chosen against ``references[0]`` exactly as in
    ``mine_pair``; ``k = 1`` gives ``([reference], student)``. None when ``mine_pair`` is None.
    """
    if k < 1:
        raise ValueError(f"mine_references: k (opsd.num_references) must be >= 1, got {k}")
    mined = _mine(rollouts)
    if mined is None:
        return None
    correct, student = mined
    refs = [correct[0][1]] + [r for _, r in correct[1:] if r is not student][: k - 1]
    return refs, student


# ----------------------------------------------------------------------------------------------
# clipped forward KL (Eq. 6-7)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def clipped_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    tau_clip: float = 10.0,
    return_stats: bool = False,
    agg: str = "token_mean",
) -> Tensor | tuple[Tensor, dict[str, float]]:
    """Eq. 7 from full logits: mean over mask-1 positions of Σ_v min(P_t(v)(log P_t − log P_s), τ)
    (``agg="token_mean"``), or each row's mean over its mask-1 positions, averaged over the rows
    that have any (``agg="seq_mean"``, the paper's 1/|R_τ| per trajectory).

    ``student_logits`` / ``teacher_logits`` ``[B, T, V]`` (position t of both predicts the
    student's token t), ``mask`` ``[B, T]``. The teacher is detached. Half-precision logits are
    upcast to float32. An all-masked batch gives 0 (with a zero gradient).

    With ``return_stats=True`` returns ``(loss, stats)``: ``clip_frac`` = share of the
    (masked position, vocabulary) terms above τ, ``kl_unclipped`` = the same mean without
    the clip (the plain forward KL).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != mask.shape:
        raise ValueError(
            f"clipped_forward_kl: student_logits {tuple(student_logits.shape)}, teacher_logits "
            f"{tuple(teacher_logits.shape)} must be [B, T, V] and mask {tuple(mask.shape)} [B, T]"
        )
    dtype = _compute_dtype(student_logits.dtype)
    log_ps = torch.log_softmax(student_logits.to(dtype), dim=-1)
    log_pt = torch.log_softmax(teacher_logits.detach().to(dtype), dim=-1)
    term = log_pt.exp() * (log_pt - log_ps)
    per_position = term.clamp(max=tau_clip).sum(dim=-1)
    keep = mask.bool()
    count = keep.to(dtype).sum().clamp(min=1.0)
    weight = position_weights(mask, agg).to(dtype)
    loss = (per_position * weight).sum()
    if not return_stats:
        return loss
    with torch.no_grad():
        n_terms = count * student_logits.shape[-1]
        stats = {
            "clip_frac": float(((term > tau_clip) & keep.unsqueeze(-1)).sum() / n_terms),
            "kl_unclipped": float((term.sum(dim=-1) * weight).sum()),
        }
    return loss, stats


def position_weights(mask: Tensor, agg: str = "token_mean") -> Tensor:
    """Weight of each ``[B, T]`` position in Eq. 7's mean (0 off the mask; the weights sum to 1,
    or to 0 for an all-masked batch): 1/|M| for ``token_mean``; 1/(|B'|·|R_b|) for ``seq_mean``,
    B' = the rows with at least one mask-1 position. A mask with values other than 0/1 (e.g.
    ``opsd.action_weight`` on action tokens) weighs each position by its value in those means:
    m / Σm, and per row m_bt / Σ_t m_bt / |B'|."""
    m = mask.to(torch.float64).clamp(min=0.0)
    if agg == "token_mean":
        return m / m.sum().clamp(min=1.0)
    if agg == "seq_mean":
        per_row = m.sum(dim=-1, keepdim=True)
        rows = (per_row > 0).sum().clamp(min=1)
        return m / per_row.clamp(min=1.0) / rows
    raise ValueError(f"opsd loss: agg must be 'token_mean' or 'seq_mean', got {agg!r}")


class _ChunkedClippedKL(torch.autograd.Function):
    """Eq. 7 from hidden states, chunk by chunk; the gradient is built in forward (the loss is a
    scalar, so backward only scales it), so backward holds no [N, V] tensor either."""

    @staticmethod
    def forward(ctx, s_hidden, t_hidden, weight, tau_clip, chunk_size, stats, pos_weight):  # noqa: D102
        need_s, _, need_w = ctx.needs_input_grad[:3]
        n, _ = s_hidden.shape
        dtype = _compute_dtype(s_hidden.dtype)
        w = weight.to(dtype)
        dev = s_hidden.device
        total = torch.zeros((), dtype=dtype, device=dev)
        total_unclipped = torch.zeros((), dtype=dtype, device=dev)
        n_clipped = 0
        grad_s = torch.zeros(s_hidden.shape, dtype=dtype, device=dev) if need_s else None
        grad_w = torch.zeros(w.shape, dtype=dtype, device=dev) if need_w else None
        pos_weight = pos_weight.to(device=dev, dtype=dtype)
        for start in range(0, n, chunk_size):
            s_c = s_hidden[start : start + chunk_size].to(dtype)
            t_c = t_hidden[start : start + chunk_size].to(dtype)
            w_c = pos_weight[start : start + chunk_size].unsqueeze(-1)
            log_ps = s_c @ w.T
            log_ps -= torch.logsumexp(log_ps, dim=-1, keepdim=True)
            log_pt = t_c @ w.T
            log_pt -= torch.logsumexp(log_pt, dim=-1, keepdim=True)
            pt = log_pt.exp()
            term = log_pt.sub_(log_ps).mul_(pt)  # reuses log_pt's buffer
            clipped = term > tau_clip
            n_clipped += int(clipped.sum())
            total_unclipped += (term.sum(dim=-1, keepdim=True) * w_c).sum()
            total += (term.clamp_(max=tau_clip).sum(dim=-1, keepdim=True) * w_c).sum()
            del term, log_pt
            if need_s or need_w:
                # d/d log_ps of min(term, τ) is −P_t where term ≤ τ (clamp's convention), 0 above;
                # through log_softmax: g − softmax(s) · Σ_v g
                g = pt.masked_fill_(clipped, 0.0).neg_()
                g_sum = g.sum(dim=-1, keepdim=True)
                grad_logits = log_ps.exp_().mul_(g_sum).neg_().add_(g).mul_(w_c)
                del g, pt
                if need_s:
                    grad_s[start : start + chunk_size] = grad_logits @ w
                if need_w:
                    grad_w.addmm_(grad_logits.T, s_c)
                del grad_logits
            del log_ps, clipped
        stats["clip_frac"] = n_clipped / max(n * weight.shape[0], 1)
        stats["kl_unclipped"] = float(total_unclipped)
        # kept on ctx (not save_for_backward): backward scales them in place and drops them,
        # so the [V, H] buffer becomes W.grad without a copy
        ctx.grads = (grad_s, grad_w)
        ctx.input_dtypes = (s_hidden.dtype, weight.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        if ctx.grads is None:
            raise RuntimeError("clipped_forward_kl_lean: its gradient was already used by an "
                               "earlier backward; recompute the loss for a second backward")
        grad_s, grad_w = ctx.grads
        ctx.grads = None
        s_dtype, w_dtype = ctx.input_dtypes
        gs = grad_s.mul_(grad_out).to(s_dtype) if grad_s is not None else None
        gw = grad_w.mul_(grad_out).to(w_dtype) if grad_w is not None else None
        return gs, None, gw, None, None, None, None


def clipped_forward_kl_lean(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    lm_head_weight: Tensor,
    mask: Tensor,
    tau_clip: float = 10.0,
    chunk_size: int = 128,
    return_stats: bool = False,
    agg: str = "token_mean",
) -> Tensor | tuple[Tensor, dict[str, float]]:
    """Eq. 7 like ``clipped_forward_kl(h_s @ W.T, h_t @ W.T, mask, τ, agg=agg)``, without [B, T, V] logits.

    ``student_hidden`` / ``teacher_hidden`` ``[B, T, H]`` (final hidden states at the student's
    token positions), ``lm_head_weight`` ``[V, H]`` (no bias, as in Llama/SmolLM2), ``mask``
    ``[B, T]``. Only mask-1 positions are gathered, then processed ``chunk_size`` rows at a
    time: peak extra memory ≈ 4 · chunk_size · V floats plus one ``[V, H]`` gradient buffer.
    Same value and gradients (w.r.t. student hidden and W) as the direct form; the teacher
    side gets no gradient. The gradient is computed during forward, so the returned loss
    supports one ordinary ``backward`` (it may be scaled or summed with other losses) but no
    second backward through the same graph and no double backward. Half-precision inputs are computed in float32; grads come back in the
    input dtype. Stats as in ``clipped_forward_kl``.
    """
    b, t, h = student_hidden.shape
    if teacher_hidden.shape != student_hidden.shape or mask.shape != (b, t):
        raise ValueError(
            f"clipped_forward_kl_lean: student_hidden {tuple(student_hidden.shape)} and "
            f"teacher_hidden {tuple(teacher_hidden.shape)} must both be [B, T, H], mask "
            f"{tuple(mask.shape)} must be [B, T]"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != h:
        raise ValueError(
            f"clipped_forward_kl_lean: lm_head_weight {tuple(lm_head_weight.shape)} must be "
            f"[V, H] with H={h}"
        )
    if chunk_size < 1:
        raise ValueError(f"clipped_forward_kl_lean: chunk_size must be >= 1, got {chunk_size}")
    pos_weight = position_weights(mask, agg).reshape(-1)
    idx = mask.reshape(-1).bool().nonzero().squeeze(-1)
    s_sel = student_hidden.reshape(-1, h).index_select(0, idx)
    t_sel = teacher_hidden.detach().reshape(-1, h).index_select(0, idx)
    weight = lm_head_weight
    if not torch.is_grad_enabled():  # evaluation: skip the gradient work done in forward
        s_sel, weight = s_sel.detach(), weight.detach()
    stats: dict[str, float] = {}
    loss = _ChunkedClippedKL.apply(s_sel, t_sel, weight, float(tau_clip), int(chunk_size), stats,
                                   pos_weight.index_select(0, idx))
    return (loss, stats) if return_stats else loss
