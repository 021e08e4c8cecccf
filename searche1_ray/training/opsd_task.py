"""OPSD training task: LoRA self-distillation — teacher = adapter off + reference in the prompt, student = adapter on.

One pair (paper §3.2-3.3) gives two token sequences that end in the *same* response tokens τ_s
(the student rollout's response, retrieved ``<information>`` included):

    student input  P_S ‖ τ_s     P_S = the rollout's own prompt (instruction ‖ question)
    teacher input  P_T ‖ τ_s     P_T = ``opsd.teacher_template`` (instruction ‖ question ‖
                                 the reference τ_ref ‖ "solve it in your own words"); τ_ref is the
                                 reference's whole response, <information> included (Eq. 4;
                                 ``opsd.teacher_reference: full``), or its policy-written text

Both forward passes run on one model: the teacher with the LoRA adapter disabled and no gradient,
the student with the adapter on. Position j of τ_s is predicted by the hidden state at
``len(P)-1+j`` of each input; the loss (Eq. 7, ``searche1_ray.opsd``) is

    L = 1/|B| Σ_τ 1/|R_τ| Σ_{j ∈ R_τ} Σ_v min( P_T(v | P_T, τ_<j) (log P_T(v | ·) − log P_S(v | P_S, τ_<j)), τ_clip )

with R_τ = the positions of trajectory τ the policy wrote (``loss_mask`` = 1), B the batch
(``opsd.loss_agg: seq_mean``; ``token_mean`` = one mean over all the batch's policy tokens). ``opsd.lean_loss`` computes it from
final hidden states and the LM head, chunk by chunk (no [B, T, V] logits); otherwise from logits.
Only the adapter trains (the base weights stay frozen, so the teacher never moves).

Samples are built from mined pairs by ``make_sample`` (needs the tokenizer, runs in the driver);
``collate_pairs`` only pads and indexes (no tokenizer), so it runs anywhere. No Ray imports.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from searche1_ray.config import Config
from searche1_ray.opsd import clipped_forward_kl, clipped_forward_kl_lean
from searche1_ray.trajectory import (INSTRUCTION, action_token_positions, information_texts,
                                    shorten_information)

from searche1_ray.training.tasks import TrainTask, full_parameters

log = logging.getLogger(__name__)

LEAN_CHUNK_SIZE = 128          # masked positions per chunk in the lean loss (≈ 4·128·V floats)
MIN_RESPONSE_TOKENS = 8        # a teacher prompt is cut so at least this much response fits


# ----------------------------------------------------------------------------------------------
# prompts and samples (driver side: needs the tokenizer)


def _question(question: str) -> str:
    q = question.strip()
    return q + "?" if q and q[-1] != "?" else q  # as trajectory.question_text does


def teacher_user_message(question: str, references: Sequence[str], template: str) -> str:
    """``opsd.teacher_template`` filled in; several references are numbered one after another."""
    refs = [r.strip() for r in references]
    if not refs:
        raise ValueError("opsd teacher prompt: at least one reference text is needed")
    reference = refs[0] if len(refs) == 1 else "\n\n".join(
        f"Reference {i}:\n{r}" for i, r in enumerate(refs, start=1))
    try:
        return template.format(instruction=INSTRUCTION, question=_question(question), reference=reference)
    except (KeyError, IndexError) as e:
        raise ValueError(f"config: opsd.teacher_template has an unknown placeholder {e}; allowed: "
                         "{instruction}, {question}, {reference} (write {{ }} for literal braces)") from None


def _wrap_chat(user: str, tokenizer: Any, use_chat_template: bool) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return user


def teacher_prompt_ids(question: str, references: Sequence[str], tokenizer: Any, cfg: Config,
                       max_tokens: int) -> list[int]:
    """Token ids of the teacher prompt P_T. A prompt over ``max_tokens`` is shortened first inside
    the references' retrieved ``<information>`` blocks (each cut to the same share, so the
    reference's searches and answer stay whole), then, if that is not enough, at the references'
    tails."""
    refs = [str(r) for r in references]

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def retrieved_tokens(texts: Sequence[str]) -> int:  # inside the blocks: what cutting can remove
        return sum(n_tokens(b) for t in texts for b in information_texts(t))

    info_keep, cutting_tails, last_len = 1.0, False, None
    for _ in range(16):
        shown = refs if (cutting_tails or info_keep >= 1.0) else [shorten_information(r, info_keep) for r in refs]
        text = _wrap_chat(teacher_user_message(question, shown, cfg.opsd.teacher_template),
                          tokenizer, cfg.model.use_chat_template)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        excess = len(ids) - max_tokens
        if excess <= 0:
            return ids
        if not cutting_tails:
            inner = retrieved_tokens(shown)
            if inner > excess and len(ids) != last_len:   # the retrieved text can absorb the cut
                last_len = len(ids)
                info_keep *= max(0.0, inner - excess - 2 * len(refs)) / inner
                continue
            # not enough retrieved text (or a cut that no longer shortens): drop it all, then the tails
            refs = [shorten_information(r, 0.0) for r in refs]
            cutting_tails = True
            continue
        ref_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in refs]
        total = sum(len(r) for r in ref_ids)
        if total == 0:
            break
        keep = max(0, total - excess - 4 * len(refs))
        refs = [tokenizer.decode(r[: len(r) * keep // total]) + " …" for r in ref_ids]
    raise ValueError(
        f"opsd: the teacher prompt for question {question[:60]!r} does not fit in {max_tokens} tokens "
        "even without the reference; raise train.max_seq_len or shorten opsd.teacher_template")


def teacher_references(pair: dict[str, Any], cfg: Config) -> list[str]:
    """What the teacher reads of the pair's references (``opsd.teacher_reference``): the whole
    responses, retrieved ``<information>`` included (Eq. 4: "full"), or their policy-written text."""
    if cfg.opsd.teacher_reference == "full":
        full = pair.get("reference_responses")
        if full is None:
            raise KeyError(f"opsd pair {pair.get('question_id')}: no 'reference_responses' column (pairs mined "
                           "by an older version); re-mine them or set opsd.teacher_reference=policy_text")
        return [str(r) for r in full]
    return [str(r) for r in pair["reference_texts"]]


def make_sample(pair: dict[str, Any], tokenizer: Any, cfg: Config) -> dict[str, Any] | None:
    """One training sample from a mined pair (``searche1_ray.pairs`` row).

    The pair carries the student rollout's ``prompt_ids`` / ``response_ids`` / ``loss_mask`` and
    the reference texts. Returns ``student_prompt_ids``, ``teacher_prompt_ids``,
    ``response_ids``, ``loss_mask`` (aligned to ``response_ids``; the response is cut so the
    student input fits in ``train.max_seq_len``; the teacher prompt is cut to ``max_seq_len - 8``),
    ``input_ids`` (= the student input, which the
    runner sorts micro-batches by) and ``question_id``; None when no policy-written token is left.
    With ``opsd.action_weight`` w ≠ 1 the policy tokens inside the student's ``<search>`` queries
    and ``<answer>`` get loss-mask value w (a weight in Eq. 7's per-trajectory mean) instead of 1.
    """
    max_len = cfg.train.max_seq_len
    response = [int(t) for t in pair["response_ids"]]
    mask = [int(m) for m in pair["loss_mask"]]
    if len(response) != len(mask):
        raise ValueError(f"opsd pair {pair.get('question_id')}: {len(response)} response ids but "
                         f"{len(mask)} loss_mask entries")
    student_prompt = [int(t) for t in pair["prompt_ids"]]
    teacher_prompt = teacher_prompt_ids(pair["question"], teacher_references(pair, cfg), tokenizer, cfg,
                                        max_tokens=max_len - MIN_RESPONSE_TOKENS)
    # the student input (the one trained through) fits in max_seq_len; the teacher input (no
    # gradient; its prompt is at most max_seq_len - 8) may run to twice that, so a whole
    # reference never crowds out the response
    keep = max(0, max_len - len(student_prompt))
    response, mask = response[:keep], mask[:keep]
    if not any(mask):
        return None
    w = float(cfg.opsd.action_weight)
    if w != 1.0:   # the action tokens weigh w in the trajectory's mean (opsd.action_weight)
        pieces = [tokenizer.decode([t]) for t in response]  # per token: exact for ASCII text
        mask = [float(m) for m in mask]
        for i in action_token_positions(pieces):
            if mask[i]:
                mask[i] = w
    return {"question_id": str(pair.get("question_id", "")), "input_ids": student_prompt + response,
            "student_prompt_ids": student_prompt, "teacher_prompt_ids": teacher_prompt,
            "response_ids": response, "loss_mask": mask}


# ----------------------------------------------------------------------------------------------
# collate (worker side: no tokenizer)


def collate_pairs(samples: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Tensor]:
    """Pad a list of samples into the two model inputs and the aligned response positions.

    Returns ``student_input_ids`` / ``student_attention_mask`` ``[B, Ls]``,
    ``teacher_input_ids`` / ``teacher_attention_mask`` ``[B, Lt]`` (right-padded),
    ``student_positions`` / ``teacher_positions`` ``[B, R]`` (R = longest response): the input
    position whose hidden state predicts response token j, i.e. ``len(prompt) - 1 + j``, and
    ``loss_mask`` ``[B, R]`` (1 = policy-written response token; 0 = retrieved or padding).
    Row b, column j of both position tensors refers to the same response token.
    """
    if not samples:
        raise ValueError("opsd collate: empty micro-batch")
    b = len(samples)
    s_seqs, t_seqs, resp_lens, s_plens, t_plens = [], [], [], [], []
    for i, s in enumerate(samples):
        resp = list(s["response_ids"])
        if len(resp) != len(s["loss_mask"]):
            raise ValueError(f"opsd collate: sample {i} has {len(resp)} response ids but "
                             f"{len(s['loss_mask'])} loss_mask entries")
        if not s["student_prompt_ids"] or not s["teacher_prompt_ids"]:
            raise ValueError(f"opsd collate: sample {i} has an empty prompt")
        s_plens.append(len(s["student_prompt_ids"]))
        t_plens.append(len(s["teacher_prompt_ids"]))
        s_seqs.append(list(s["student_prompt_ids"]) + resp)
        t_seqs.append(list(s["teacher_prompt_ids"]) + resp)
        resp_lens.append(len(resp))

    def pad(seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(len(x) for x in seqs)
        ids = torch.full((b, width), pad_id, dtype=torch.long)
        att = torch.zeros((b, width), dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            att[i, : len(x)] = 1
        return ids, att

    s_ids, s_att = pad(s_seqs)
    t_ids, t_att = pad(t_seqs)
    r = max(max(resp_lens), 1)
    s_pos = torch.zeros((b, r), dtype=torch.long)
    t_pos = torch.zeros((b, r), dtype=torch.long)
    mask = torch.zeros((b, r), dtype=torch.float32)
    j = torch.arange(r)
    for i, s in enumerate(samples):
        n = resp_lens[i]
        s_pos[i] = (s_plens[i] - 1 + j).clamp(max=s_plens[i] - 1 + max(n - 1, 0))
        t_pos[i] = (t_plens[i] - 1 + j).clamp(max=t_plens[i] - 1 + max(n - 1, 0))
        mask[i, :n] = torch.tensor([float(m) for m in s["loss_mask"]], dtype=torch.float32)
    return {"student_input_ids": s_ids, "student_attention_mask": s_att,
            "teacher_input_ids": t_ids, "teacher_attention_mask": t_att,
            "student_positions": s_pos, "teacher_positions": t_pos, "loss_mask": mask}


# ----------------------------------------------------------------------------------------------
# the model side


def _unwrap(model: Any) -> Any:
    """The peft model inside a DeepSpeed engine / DDP wrapper (both keep it in ``.module``)."""
    from peft import PeftModel

    while not isinstance(model, PeftModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, PeftModel):
        raise TypeError(f"opsd: expected a peft model (OPSDTask.prepare_model wraps it), got {type(model).__name__}")
    return model


def _gather(hidden: Tensor, positions: Tensor) -> Tensor:
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def response_hidden(peft_model: Any, input_ids: Tensor, attention_mask: Tensor, positions: Tensor) -> Tensor:
    """Final (normed) hidden states ``[B, R, H]`` at ``positions``, from the decoder stack only
    (the LM head is not applied, so no [B, L, V] logits are made). LoRA layers live inside the
    decoder, so the adapter's enabled/disabled state applies."""
    decoder = peft_model.get_base_model().base_model
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return _gather(out.last_hidden_state, positions)


def opsd_loss(model: Any, batch: dict[str, Tensor], tau_clip: float, lean: bool,
              chunk_size: int = LEAN_CHUNK_SIZE, agg: str = "token_mean") -> tuple[Tensor, dict[str, float]]:
    """Eq. 7 for a collated micro-batch: teacher = adapter disabled, no grad, teacher input;
    student = adapter on, student input; both over the student's response positions.

    The decoder and the head run as modules (ZeRO-3 gathers their weights around each call).
    The lean loss reads the head's weight matrix itself, outside any module call, so it is
    gathered for the loss (``full_parameters``: a no-op below ZeRO-3); the lean loss builds its
    gradient inside that call, and the head is frozen (only the adapter trains), so nothing
    needs the full matrix after the block."""
    pm = _unwrap(model)
    dev = next(p for p in pm.parameters()).device
    batch = {k: v.to(dev) for k, v in batch.items()}
    mask = batch["loss_mask"]
    with torch.no_grad(), pm.disable_adapter():
        t_hidden = response_hidden(pm, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                                   batch["teacher_positions"])
    s_hidden = response_hidden(pm, batch["student_input_ids"], batch["student_attention_mask"],
                               batch["student_positions"])
    head = pm.get_base_model().get_output_embeddings()
    if lean:
        weight = head.weight
        if hasattr(weight, "ds_id") and weight.requires_grad:
            raise NotImplementedError(
                "opsd: the lean loss under ZeRO-3 needs a frozen LM head (its gathered weight is "
                "released before backward); keep lm_head out of opsd.target_modules or set "
                "opsd.lean_loss=false")
        with full_parameters([weight]):
            loss, stats = clipped_forward_kl_lean(s_hidden, t_hidden, weight, mask, tau_clip,
                                                  chunk_size=chunk_size, return_stats=True, agg=agg)
    else:
        with torch.no_grad():
            t_logits = head(t_hidden)
        loss, stats = clipped_forward_kl(head(s_hidden), t_logits, mask, tau_clip, return_stats=True, agg=agg)
    metrics = {"opsd/kl": float(loss.detach()), "opsd/clip_frac": stats["clip_frac"],
               "opsd/kl_unclipped": stats["kl_unclipped"]}
    return loss, metrics


def merged_state_dict(model: Any, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The policy's weights with the adapter merged in (W + ΔW, summed in float32), under the
    plain Hugging Face names (``model.layers.0.self_attn.q_proj.weight``…), as new contiguous CPU
    tensors of ``dtype`` (None = the base weights' own); tied duplicates (``lm_head`` = the embedding) are dropped, as in
    ``tasks.full_state_dict``. The live model is not touched: an in-place merge/unmerge would
    round the bf16 base weights every time."""
    from peft.tuners.lora import LoraLayer

    pm = _unwrap(model)
    base = pm.get_base_model()
    adapter = pm.active_adapter if isinstance(pm.active_adapter, str) else pm.active_adapter[0]
    deltas: dict[str, Tensor] = {}
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
                deltas[f"{name}.weight"] = module.get_delta_weight(adapter).float()
        for key, value in base.state_dict().items():
            if ".lora_" in key:
                continue
            if value.data_ptr() in seen and value.numel() > 0:
                continue  # a tied weight already exported under its first name
            seen.add(value.data_ptr())
            key = key.replace(".base_layer.", ".")
            t = value.detach().to("cpu")
            want = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            if key in deltas:
                t = t.float() + deltas.pop(key).to("cpu")
            out[key] = t.to(want).contiguous().clone()
    if deltas:
        raise RuntimeError(f"opsd: LoRA deltas without a base weight: {sorted(deltas)[:3]}")
    return out


class OPSDTask(TrainTask):
    """The LoRA-OPSD task for ``TrainRunner``: samples are ``make_sample`` dicts. ``opsd.loss_agg``
    says how the runner weighs a sample in the batch mean: ``seq_mean`` (the paper's Eq. 7) = 1 per
    trajectory, each trajectory's loss being the mean over its own policy tokens; ``token_mean`` =
    its number of policy-written response tokens (``loss_mask``)."""

    name = "opsd"

    def __init__(self, cfg: Config, pad_id: int = 0, grad_clip: float = 1.0):
        # one optimizer step per runner step (the whole batch), constant lr
        super().__init__(cfg.opsd.lr, grad_clip=grad_clip)
        self.cfg = cfg
        self.pad_id = pad_id

    def prepare_model(self, model: Any, cfg: Config | None = None) -> Any:
        """Wrap the policy in a fresh LoRA adapter (rank, alpha, dropout, target modules from
        ``opsd``); the base weights are frozen. B = 0 at start, so student = policy at step 0."""
        from peft import LoraConfig, get_peft_model

        o = (cfg or self.cfg).opsd
        lora = LoraConfig(r=o.lora_r, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout,
                          target_modules=list(o.target_modules), task_type="CAUSAL_LM", bias="none")
        if (cfg or self.cfg).train.gradient_checkpointing:
            model.enable_input_require_grads()
        pm = get_peft_model(model, lora)
        trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        log.info("opsd: LoRA r=%d alpha=%d on %s: %d trainable parameters", o.lora_r, o.lora_alpha,
                 ",".join(o.target_modules), trainable)
        return pm

    def sample_weight(self, sample: dict) -> float:
        tokens = super().sample_weight(sample)
        return tokens if self.cfg.opsd.loss_agg == "token_mean" else float(tokens > 0)

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        return collate_pairs(samples, pad_id=self.pad_id)

    def loss(self, model: Any, micro_batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return opsd_loss(model, micro_batch, self.cfg.opsd.tau_clip, self.cfg.opsd.lean_loss,
                         agg=self.cfg.opsd.loss_agg)

    def export_weights(self, model: Any) -> dict[str, Tensor]:
        return merged_state_dict(model)

    def save_adapter(self, model: Any, path: str | Path) -> str:
        """Write only the adapter (peft format: adapter_config.json + adapter_model.safetensors)."""
        _unwrap(model).save_pretrained(str(path))
        return str(path)


def merge_adapter_into_policy(policy_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                              dtype: str = "bfloat16") -> str:
    """``merge_and_unload`` a saved adapter into its base policy and write a full HF folder
    (weights + config + tokenizer) that transformers and vLLM load: the next policy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # merge in float32, then store in the policy's dtype
    base = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged = merged.to(getattr(torch, dtype))
    from searche1_ray.durable import durable_folder

    out = Path(out_dir)
    with durable_folder(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(policy_dir)).save_pretrained(str(tmp))
    log.info("opsd: merged %s into %s -> %s", adapter_dir, policy_dir, out)
    return str(out)
