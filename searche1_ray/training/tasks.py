"""Training tasks plugged into the TrainRunner: the base interface, SFT (warm start) and GRPO.

A task says *what* is optimised; the runner (runner.py) says *how* (Ray Train workers,
DeepSpeed, sharding, gradient accumulation). A task object is built in the driver, pickled to
every train worker, and there:

    model = task.prepare_model(model, cfg)          once, before DeepSpeed wraps it
    for epoch in range(task.epochs):
        for minibatch in task.minibatches(batch):    one optimizer step each
            for micro in shard(minibatch):           this rank's rows, micro_batch_size at a time
                loss, metrics = task.loss(model, task.collate(micro))
    state_dict = task.export_weights(model)          full HF-named weights (merged if LoRA)

``loss`` returns a mean over the micro-batch's loss tokens; the runner rescales it by
``sum(sample_weight) of the micro-batch / sum over the whole minibatch`` so the optimizer sees
the token-mean over the *global* minibatch, whatever the sharding (every rank holds the whole
batch, so it knows the global weight without communication).

Samples (pipelines.py) are dicts of 1-D numpy arrays aligned to ``input_ids``:
``loss_mask`` (1 where the token is a loss target: the policy wrote it), plus per task
``old_logprobs`` / ``advantage`` (GRPO). Position t of ``old_logprobs`` is log π(ids[t] | ids[<t]).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from searche1_ray.config import Config
from searche1_ray.grpo import policy_loss, token_logprobs, updates_per_step


def pad_samples(samples: Sequence[dict], keys: Sequence[str], pad_values: dict[str, float] | None = None
                ) -> dict[str, torch.Tensor]:
    """Right-pad the 1-D arrays ``keys`` of ``samples`` to the longest ``input_ids`` and stack
    them; adds ``attention_mask``. Scalars (e.g. ``advantage``) are stacked as ``[B]``."""
    pad_values = pad_values or {}
    if not samples:
        raise ValueError("pad_samples: no samples to collate")
    lengths = [len(s["input_ids"]) for s in samples]
    width = max(lengths)
    out: dict[str, torch.Tensor] = {}
    attn = torch.zeros(len(samples), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
    out["attention_mask"] = attn
    for key in keys:
        first = np.asarray(samples[0][key])
        if first.ndim == 0:
            out[key] = torch.as_tensor(np.stack([np.asarray(s[key]) for s in samples]))
            continue
        dtype = torch.long if np.issubdtype(first.dtype, np.integer) else torch.float32
        t = torch.full((len(samples), width), pad_values.get(key, 0), dtype=dtype)
        for i, s in enumerate(samples):
            arr = np.asarray(s[key])
            if len(arr) != lengths[i]:
                raise ValueError(f"pad_samples: sample {i} has {len(arr)} '{key}' entries but "
                                 f"{lengths[i]} input_ids; they must be aligned")
            t[i, : len(arr)] = torch.tensor(arr, dtype=dtype)
        out[key] = t
    return out


def causal_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> torch.Tensor:
    """log π(ids[t] | ids[<t]) for t >= 1, shape ``[B, T-1]`` (float32)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return token_logprobs(logits[:, :-1], input_ids[:, 1:])


def masked_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    loss_mask: torch.Tensor) -> torch.Tensor:
    """log π(ids[t] | ids[<t]) at the positions t where ``loss_mask[:, t]`` is 1, flattened in
    row-major order: shape ``[K]``, K = number of loss tokens (float32).

    The output layer runs only on those K hidden states (decoder + ``get_output_embeddings``,
    right for Llama / Qwen / SmolLM heads without logit scaling): prompt and retrieved tokens,
    often 3/4 of a trajectory, never materialise ``[T, V]`` logits. Models without a
    ``get_decoder`` fall back to full logits.
    """
    select = loss_mask[:, 1:].bool()
    targets = input_ids[:, 1:][select]
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is not None and head is not None and decoder is not model:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][select])
        return token_logprobs(logits, targets)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return token_logprobs(logits[:, :-1][select], targets)


def rank_micro_batches(minibatch: Sequence[dict], rank: int, world: int, micro_batch_size: int
                       ) -> list[list[int] | None]:
    """This rank's micro-batches of a global minibatch, as row indices: the rows sorted by length
    are dealt round-robin (``rank::world``) so ranks get similar work and micro-batches similar
    lengths; every rank gets the same number of micro-batches, a short shard padded with None
    (a zero-weight dummy: ZeRO-2 reduces gradients in every backward, so all ranks must run it)."""
    by_len = sorted(range(len(minibatch)), key=lambda i: len(minibatch[i]["input_ids"]))
    mine = by_len[rank::world]
    micros: list[list[int] | None] = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    n_micro = math.ceil(math.ceil(len(minibatch) / world) / micro_batch_size)
    return micros + [None] * (n_micro - len(micros))


def shortest_row(minibatch: Sequence[dict]) -> int:
    """Index of the shortest sample: what a zero-weight padding micro-batch runs on."""
    return min(range(len(minibatch)), key=lambda i: len(minibatch[i]["input_ids"]))


@contextlib.contextmanager
def full_parameters(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Inside the block, ``params`` hold their full values on every rank, whatever the ZeRO stage.

    ZeRO-3 partitions each parameter over the ranks (``param.data`` is an empty placeholder,
    the rank's slice lives in ``param.ds_tensor``) and gathers it only around a module's own
    forward/backward; code that reads a weight outside that — an export, a loss that takes the
    LM-head matrix itself — must gather it first. This gathers the partitioned ones (those with
    a ``ds_id``) read-only (``modifier_rank=None``: nothing is broadcast back; they are
    partitioned again on exit). Every rank must enter the block (it is an all-gather). Under
    ZeRO 0-2, or for a plain model, nothing is partitioned: the block costs one pass over
    ``params`` and does not import DeepSpeed.
    """
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def full_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF-named weights as contiguous CPU tensors of ``dtype`` (None = as trained: the engines
    then serve exactly the trainer's policy); tied duplicates (``lm_head`` sharing the
    embedding) are dropped, as ``save_pretrained`` does."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu", dtype if (dtype is not None and t.is_floating_point()) else t.dtype
                                  ).contiguous().clone()
    return out


class TrainTask:
    """Base task: the knobs the runner reads, with neutral defaults."""

    name = "train"                  # metric namespace: "<name>/loss", "<name>/grad_norm", ...
    collate_keys: tuple[str, ...] = ("input_ids", "loss_mask")
    pre_update_metrics: tuple[str, ...] = ()  # reported from the first minibatch of epoch 0 only
    # checkpoints also hold the optimizer's state and the lr schedule's position (DeepSpeed's
    # checkpoint of every rank, in <folder>/trainer_state), and a runner started with
    # ``resume_from`` = such a folder loads them: a resumed round continues the same optimisation
    save_optimizer: bool = False
    resume_from: str | None = None

    def __init__(self, lr: float, *, epochs: int = 1, mini_batch_size: int = 0,
                 warmup_steps: int = 0, total_steps: int = 0, grad_clip: float = 1.0,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)):
        self.lr = float(lr)
        self.epochs = int(epochs)
        self.mini_batch_size = int(mini_batch_size)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.grad_clip = float(grad_clip)
        self.weight_decay = float(weight_decay)
        self.betas = tuple(betas)

    # -- model -------------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
        return model

    def export_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return full_state_dict(model)

    # -- data --------------------------------------------------------------------------------
    def minibatches(self, batch: Sequence[dict]) -> list[list[dict]]:
        """Global minibatches of a step's batch, one optimizer step each (in order)."""
        rows = list(batch)
        size = self.mini_batch_size or len(rows)
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    def updates_per_step(self, num_samples: int) -> int:
        """Optimizer updates one step of ``num_samples`` samples makes: epochs x minibatches."""
        return updates_per_step(num_samples, self.mini_batch_size, self.epochs)

    def sample_weight(self, sample: dict) -> float:
        """How much a sample counts in the minibatch mean: its number of loss tokens."""
        return float(np.asarray(sample["loss_mask"]).sum())

    def collate(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return pad_samples(samples, self.collate_keys)

    def loss(self, model: torch.nn.Module, micro_batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # -- schedule ----------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step`` (0-based): linear warm-up over
        ``warmup_steps``, then constant, or a linear decay to 0 at ``total_steps`` if set."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps:
            left = self.total_steps - step
            span = max(1, self.total_steps - self.warmup_steps)
            return max(0.0, left / span)
        return 1.0


class SFTTask(TrainTask):
    """Warm start: cross-entropy on the policy-written tokens of oracle trajectories.

        L(θ) = − 1/|T| Σ_{(i,t) ∈ T} log π_θ(y_{i,t} | x_i, y_{i,<t})

    T = tokens with loss_mask 1 (the <think>/<search>/<answer> text the oracle wrote); the
    prompt and retrieved <information> blocks are context only.
    """

    name = "sft"

    @classmethod
    def from_config(cls, cfg: Config, total_steps: int) -> "SFTTask":
        warmup = max(1, math.ceil(0.1 * total_steps)) if total_steps > 2 else 0
        return cls(cfg.warmstart.lr, warmup_steps=warmup, total_steps=total_steps, grad_clip=1.0,
                   weight_decay=0.0)

    def loss(self, model, micro_batch):
        lp = masked_logprobs(model, micro_batch["input_ids"], micro_batch["attention_mask"],
                             micro_batch["loss_mask"])
        nll = -lp.sum() / max(1, lp.numel())
        with torch.no_grad():
            metrics = {"sft/loss": float(nll), "sft/token_prob": float(lp.exp().mean()) if lp.numel() else 0.0}
        return nll, metrics


class GRPOTask(TrainTask):
    """GRPO update (grpo.py, paper Eq. 2): PPO-clip on group-normalised advantages, averaged
    over policy-written tokens (``grpo.loss_agg``: a token-mean over the minibatch, or the mean of
    each trajectory's token-mean), k3 KL to a frozen copy of the round's starting policy.

    π_old (``grpo.old_logprobs``): "engine" = the rollout engine's sampling log-probs
    (``old_logprobs`` of the samples), so ρ = π_θ / π_rollout; "recompute" = the trainer's own
    log-probs of the batch under the weights that generated it, computed by
    ``recompute_old_logprobs`` before the step's first update (as verl does), so ρ is exactly 1 on
    the first minibatch and later minibatches see only the step's own updates. "auto" recomputes
    when a step makes more than one update. ``grpo/logprob_gap`` = mean |log π_θ − log π_rollout|
    over the loss tokens of the first minibatch (before any update), i.e. the trainer/engine
    numerical gap, in both modes; ``grpo/ratio_dev`` = mean |ρ − 1| there (0 when exactly on-policy).
    """

    name = "grpo"
    collate_keys = ("input_ids", "loss_mask", "old_logprobs", "advantage")
    pre_update_metrics = ("grpo/logprob_gap", "grpo/ratio_dev", "grpo/ratio_mean")

    def __init__(self, cfg: Config, *, use_reference: bool | None = None, lr: float | None = None,
                 reference_path: str | None = None, resume_from: str | None = None,
                 **overrides: Any):
        g = cfg.grpo
        kwargs: dict[str, Any] = dict(epochs=g.ppo_epochs, mini_batch_size=g.mini_batch_size,
                                      warmup_steps=g.warmup_steps, grad_clip=g.grad_clip,
                                      weight_decay=g.weight_decay)
        kwargs.update(overrides)
        super().__init__(g.lr if lr is None else lr, **kwargs)
        self.clip_eps = g.clip_eps
        self.kl_coef = g.kl_coef
        self.loss_agg = g.loss_agg
        # updates a nominal step makes (every group kept): what warmup_ratio and "auto" count on
        nominal = self.updates_per_step(g.questions_per_step * cfg.rollout.group_size)
        if g.warmup_ratio and "warmup_steps" not in overrides:
            self.warmup_steps = math.ceil(g.warmup_ratio * g.steps_per_round * nominal)
        mode = g.old_logprobs if g.old_logprobs != "auto" else ("recompute" if nominal > 1 else "engine")
        self.recompute_old = mode == "recompute"
        if self.recompute_old:
            self.collate_keys = self.collate_keys + ("engine_logprobs",)
        self.use_reference = (g.kl_coef > 0) if use_reference is None else use_reference
        self.reference: torch.nn.Module | None = None
        # the KL reference's folder when it is not the policy being trained (a round resumed
        # mid-way trains from its last checkpoint; its reference is the round's starting policy)
        self.reference_path = reference_path
        self.save_optimizer = bool(g.save_optimizer)
        self.resume_from = resume_from

    def prepare_model(self, model, cfg):
        if self.use_reference:
            if self.reference_path:
                self.reference = type(model).from_pretrained(self.reference_path, dtype=model.dtype)
                self.reference.config.use_cache = False
                self.reference.eval().requires_grad_(False)
            else:
                self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        return model

    def sample_weight(self, sample: dict) -> float:
        """token_mean: the sample's loss tokens; seq_mean: 1 per trajectory with any."""
        tokens = super().sample_weight(sample)
        return tokens if self.loss_agg == "token_mean" else float(tokens > 0)

    def loss(self, model, micro_batch):
        ids, attn, lmask = micro_batch["input_ids"], micro_batch["attention_mask"], micro_batch["loss_mask"]
        select = lmask[:, 1:].bool()
        lp = masked_logprobs(model, ids, attn, lmask)
        old = micro_batch["old_logprobs"][:, 1:][select].to(torch.float32)
        engine = micro_batch["engine_logprobs"][:, 1:][select].to(torch.float32) if self.recompute_old else old
        adv = micro_batch["advantage"].to(torch.float32)[:, None].expand_as(select)[select]
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = masked_logprobs(self.reference, ids, attn, lmask)
        with torch.no_grad():  # trainer vs rollout engine / vs pi_old, over this micro-batch's loss tokens
            n = max(1, lp.numel())
            gap = float((lp - engine).abs().sum() / n)
            ratio_dev = float(((lp - old).exp() - 1.0).abs().sum() / n)
        if self.loss_agg == "token_mean":
            # the loss tokens of the micro-batch as one row: the token-mean is unchanged
            mask = torch.ones_like(lp)[None]
            lp, old, adv, ref = (None if x is None else x[None] for x in (lp, old, adv, ref))
        else:
            # back to [B, T-1] rows (zeros off the mask) so that each trajectory is averaged alone
            mask = select
            lp, old, adv, ref = (None if x is None else x.new_zeros(select.shape).masked_scatter(select, x)
                                 for x in (lp, old, adv, ref))
        loss, m = policy_loss(lp, old, adv, mask, clip_eps=self.clip_eps, ref_logprobs=ref,
                              kl_coef=self.kl_coef, agg=self.loss_agg)
        metrics = {"grpo/loss": float(loss.detach()), "grpo/pg_loss": m["pg_loss"],
                   "grpo/kl": m["kl"], "grpo/clip_frac": m["clip_frac"],
                   "grpo/ratio_mean": m["ratio_mean"], "grpo/ratio_dev": ratio_dev,
                   "grpo/logprob_gap": gap}
        return loss, metrics

    @torch.no_grad()
    def recompute_old_logprobs(self, model: torch.nn.Module, batch: Sequence[dict], rank: int, world: int,
                               micro_batch_size: int, device: torch.device | str = "cpu") -> list[dict]:
        """π_old = the current (not yet updated) weights: a copy of ``batch`` whose samples this
        rank trains on carry the trainer's log-probs as ``old_logprobs`` and the engine's as
        ``engine_logprobs``. Run before the step's first update; the micro-batches are the ones
        the update will use (same rows, same padding), so ρ is exactly 1 on the first minibatch.
        Rows of other ranks are left as they are (each rank only reads its own)."""
        out = [dict(s) for s in batch]
        for s in out:
            s["engine_logprobs"] = s["old_logprobs"]
        for minibatch in self.minibatches(out):
            for idx in rank_micro_batches(minibatch, rank, world, micro_batch_size):
                # a padding micro-batch still runs a forward: under ZeRO-3 every forward gathers
                # parameters from all ranks, so a rank that skipped one would hang the others
                rows = [minibatch[shortest_row(minibatch)]] if idx is None else [minibatch[i] for i in idx]
                mb = {k: v.to(device) for k, v in pad_samples(rows, ("input_ids", "loss_mask")).items()}
                lp = masked_logprobs(model, mb["input_ids"], mb["attention_mask"], mb["loss_mask"]).float().cpu()
                if idx is None:
                    continue
                select = mb["loss_mask"][:, 1:].bool().cpu()
                k = 0
                for row, sel in zip(rows, select):
                    n = int(sel.sum())
                    old = np.zeros(len(row["input_ids"]), dtype=np.float32)
                    old[1:][sel[: len(row["input_ids"]) - 1].numpy()] = lp[k:k + n].numpy()
                    row["old_logprobs"] = old
                    k += n
        return out
