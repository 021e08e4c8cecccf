"""The Ray Train worker side of TrainRunner: one rank's DeepSpeed engine and its command loop.

Every rank loads the policy (bf16 when DeepSpeed's config says so: ``train.bf16`` resolved by
searche1_ray/hardware.py, always on GPU), lets the task prepare it (e.g.
LoRA, a frozen reference), wraps it with DeepSpeed (deepspeed_config.py, a ``torch.optim.AdamW``
object and a ``LambdaLR`` from ``task.lr_factor``) and then executes the commands the driver sends
through the CommandChannel (runner.py) until ``stop``:

    step        every rank reads the batch from the object store; a task that recomputes π_old
                (GRPO with several updates per step) first scores its rows under the current
                weights; then per minibatch (one optimizer
                step) it deals the length-sorted rows round-robin (rank::world), runs the same
                number of micro-batches as every other rank (a zero-weight dummy pads a short
                shard: ZeRO-2 reduces gradients in every backward), scales each micro-batch loss
                by its share of the minibatch's loss tokens × world (DeepSpeed averages over
                ranks), then steps; metrics are token-weighted means gathered to rank 0
    weights     rank 0 puts the task's export (full HF state dict) into the object store
    save        rank 0 writes an HF folder; every rank calls ``ray.train.report`` (a barrier);
                a task with ``save_optimizer`` (GRPO) adds every rank's optimizer shard and the lr
                schedule (DeepSpeed's checkpoint) in <folder>/trainer_state, which a runner whose
                task has ``resume_from`` = that folder loads after DeepSpeed starts
    logprobs    per-sample log-probs under the current weights (for checks)
    bcast_*     rank 0 joins the engines' weight-sync group and broadcasts (engine/weight_sync.py)

Under ZeRO-3 (GPU, or ``train.zero_stage=3`` on CPU) each parameter is partitioned over the
ranks and only gathered around a module's forward/backward, so every rank runs the same number
of forwards in ``step`` and ``logprobs`` (padding with dummies), and exports gather the
parameters on every rank first (``tasks.full_parameters``).
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

import ray

from searche1_ray.config import Config
from searche1_ray.training.tasks import rank_micro_batches, shortest_row

log = logging.getLogger("searche1.train")

READY = -1  # sequence number of the "worker is up" message
TRAINER_STATE = "trainer_state"  # a checkpoint's optimizer + lr schedule (DeepSpeed's checkpoint)


def worker_loop(config: dict) -> None:
    """Body of every Ray Train worker: build the engine, then serve commands until ``stop``."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    channel = config["channel"]
    try:
        worker = _Worker(config["cfg"], config["task"], config["model_path"], rank,
                         ray.train.get_context().get_world_size())
    except BaseException:
        ray.get(channel.put_result.remote(READY, rank, {"error": traceback.format_exc()}))
        raise
    ray.get(channel.put_result.remote(READY, rank, {"ok": True}))
    while True:
        cmd = ray.get(channel.next_command.remote(rank))
        if cmd["kind"] == "stop":
            return
        try:
            result = getattr(worker, f"do_{cmd['kind']}")(cmd)
        except BaseException:
            ray.get(channel.put_result.remote(cmd["seq"], rank, {"error": traceback.format_exc()}))
            raise
        ray.get(channel.put_result.remote(cmd["seq"], rank, result if rank == 0 else None))


def skip_shm_comm_build() -> None:
    """Tell DeepSpeed its CPU shared-memory comm op is unavailable, so it does not JIT-compile it.

    On CPU, DeepSpeed's comm backend builds ``deepspeed_shm_comm`` (g++ + ninja, ~50 s on a new
    machine or HOME) when it starts, but that op only serves ``inference_all_reduce`` (tensor-
    parallel inference). Training collectives — ZeRO-2's gradient reduce-scatter, all-gathers —
    go through torch.distributed (gloo), which ``inference_all_reduce`` also falls back to.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class _Worker:
    """One rank: the DeepSpeed engine around the task's model, and the command handlers."""

    def __init__(self, cfg: Config, task: Any, model_path: str, rank: int, world: int):
        import deepspeed
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from searche1_ray.training.deepspeed_config import deepspeed_config

        self.cfg, self.task, self.rank, self.world = cfg, task, rank, world
        self.model_path = model_path
        torch.manual_seed(cfg.run.seed)
        torch.set_num_threads(max(1, int(round(cfg.train.cpus_per_worker))))
        self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.train.use_gpu else torch.device("cpu")
        ds_cfg = deepspeed_config(cfg.train, task.grad_clip, world)
        # the weights' dtype is DeepSpeed's bf16 decision (train.bf16 resolved; always bf16 on GPU)
        dtype = torch.bfloat16 if ds_cfg["bf16"]["enabled"] else torch.float32
        self.zero3 = ds_cfg["zero_optimization"]["stage"] == 3
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model.config.use_cache = False
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = task.prepare_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=task.lr, betas=task.betas, weight_decay=task.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, task.lr_factor)
        if not cfg.train.use_gpu:
            skip_shm_comm_build()
        # Ray Train already made the torch.distributed group; this only points DeepSpeed's comm
        # layer at it (without it ZeRO-2's gradient reduce asserts "DeepSpeed backend not set")
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg,
            dist_init_required=False)
        self.module = self.engine.module
        if getattr(task, "resume_from", None):
            self._load_trainer_state(Path(task.resume_from))
        reference = getattr(task, "reference", None)
        if reference is not None:
            reference.to(self.device)
        if rank == 0:
            self.hf_config = AutoConfig.from_pretrained(model_path)
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)

    # -- helpers -------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _gather_objects(self, obj: Any) -> list:
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    # -- commands ------------------------------------------------------------------------------
    def do_step(self, cmd: dict) -> dict[str, float]:
        (batch,) = ray.get(cmd["batch"])
        task, engine = self.task, self.engine
        micro_bs = self.cfg.train.micro_batch_size
        self.module.train()
        sums: dict[str, float] = {}
        first: dict[str, float] = {}
        weight_total = first_weight = 0.0
        grad_norms, opt_steps = [], 0
        t_fwd_bwd = t_optim = t_old = 0.0
        if getattr(task, "recompute_old", False):  # pi_old = these weights, before any update
            t0 = time.perf_counter()
            batch = task.recompute_old_logprobs(self.module, batch, self.rank, self.world, micro_bs, self.device)
            t_old = time.perf_counter() - t0
        for epoch in range(task.epochs):
            for mb_i, minibatch in enumerate(task.minibatches(batch)):
                weights = [task.sample_weight(s) for s in minibatch]
                total = sum(weights)
                # length-sorted rows dealt round-robin, the same number of micro-batches on every
                # rank (None = a zero-weight dummy that keeps the ranks in step)
                micros = rank_micro_batches(minibatch, self.rank, self.world, micro_bs)
                n_micro = len(micros)
                t0 = time.perf_counter()
                for k, idx in enumerate(micros):
                    engine.set_gradient_accumulation_boundary(k == n_micro - 1)
                    rows = [minibatch[shortest_row(minibatch)]] if idx is None else [minibatch[i] for i in idx]
                    w = 0.0 if idx is None else sum(weights[i] for i in idx)
                    loss, m = task.loss(self.module, self._to_device(task.collate(rows)))
                    scale = (w / total * self.world) if total > 0 else 0.0
                    engine.backward(loss * scale, scale_wrt_gas=False)
                    for key, v in m.items():
                        sums[key] = sums.get(key, 0.0) + v * w
                        if epoch == 0 and mb_i == 0:
                            first[key] = first.get(key, 0.0) + v * w
                    weight_total += w
                    if epoch == 0 and mb_i == 0:
                        first_weight += w
                t1 = time.perf_counter()
                engine.step()
                t_optim += time.perf_counter() - t1
                t_fwd_bwd += t1 - t0
                opt_steps += 1
                gn = engine.get_global_grad_norm()
                if gn is not None:
                    grad_norms.append(float(gn))
        import resource

        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        parts = self._gather_objects((sums, weight_total, first, first_weight, rss_gib))
        if self.rank != 0:
            return {}
        wt = sum(p[1] for p in parts)
        fw = sum(p[3] for p in parts)
        metrics = {}
        for key in sums:
            if key in task.pre_update_metrics:
                metrics[key] = sum(p[2].get(key, 0.0) for p in parts) / fw if fw else 0.0
            else:
                metrics[key] = sum(p[0].get(key, 0.0) for p in parts) / wt if wt else 0.0
        metrics[f"{task.name}/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
        metrics[f"{task.name}/lr"] = float(self.scheduler.get_last_lr()[0])
        metrics[f"{task.name}/loss_tokens"] = wt
        metrics[f"{task.name}/optimizer_steps"] = opt_steps
        metrics["perf/train_peak_rss_gib"] = max(p[4] for p in parts)
        metrics["perf/train_fwd_bwd_s"] = t_fwd_bwd
        metrics["perf/train_optim_s"] = t_optim
        metrics["perf/train_old_logprobs_s"] = t_old
        return metrics

    def _export(self) -> dict | None:
        """Rank 0: the task's export (full HF state dict). Every rank must call it: under ZeRO-3
        the parameters are gathered from all ranks first (``full_parameters``; no-op below)."""
        from searche1_ray.training.tasks import full_parameters

        with full_parameters(self.module.parameters()):
            return self.task.export_weights(self.module) if self.rank == 0 else None

    def do_weights(self, cmd: dict) -> list | None:
        sd = self._export()
        return [ray.put(sd)] if self.rank == 0 else None

    def do_bcast_address(self, cmd: dict) -> tuple | None:
        import socket

        if self.rank != 0:
            return None
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def do_bcast_open(self, cmd: dict) -> list | None:
        from searche1_ray.engine.weight_sync import open_group, tensor_meta

        sd = self._export()  # every rank takes part (ZeRO-3 gathers); rank 0 keeps the layout
        if self.rank != 0:
            return None
        self.bcast_group = open_group(cmd["address"], cmd["port"], 0, cmd["world"], cmd["backend"])
        return tensor_meta(sd)

    def do_bcast_send(self, cmd: dict) -> int | None:
        from searche1_ray.engine.weight_sync import broadcast_state_dict

        sd = self._export()
        return broadcast_state_dict(self.bcast_group, sd) if self.rank == 0 else None

    def do_logprobs(self, cmd: dict) -> list | None:
        import numpy as np
        import torch

        from searche1_ray.training.tasks import causal_logprobs, pad_samples

        (batch,) = ray.get(cmd["batch"])
        self.module.eval()
        mine = {}
        rows = list(range(self.rank, len(batch), self.world))
        if self.zero3:  # every forward all-gathers weights: all ranks run as many (None = padding)
            rows += [None] * (-(-len(batch) // self.world) - len(rows))
        with torch.no_grad():
            for i in rows:
                b = self._to_device(pad_samples([batch[0 if i is None else i]], ["input_ids"]))
                lp = causal_logprobs(self.module, b["input_ids"], b["attention_mask"])[0]
                if i is not None:
                    mine[i] = np.concatenate([[0.0], lp.float().cpu().numpy()]).astype(np.float32)
        merged: dict[int, Any] = {}
        for part in self._gather_objects(mine):
            merged.update(part)
        return [merged[i] for i in range(len(batch))] if self.rank == 0 else None

    def do_save(self, cmd: dict) -> str | None:
        import ray.train

        folder = Path(cmd["path"])
        sd = self._export()
        checkpoint = None
        if self.rank == 0:
            save_hf_folder(folder, sd, self.hf_config, self.tokenizer, Path(self.model_path))
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(dict(cmd.get("metrics", {})), checkpoint=checkpoint,
                         checkpoint_dir_name=folder.name, delete_local_checkpoint_after_upload=False)
        if getattr(self.task, "save_optimizer", False):  # after the report: not in Ray Train's copy
            self._save_trainer_state(folder)
        return str(folder) if self.rank == 0 else None

    def _save_trainer_state(self, folder: Path) -> None:
        """Adam's moments and the lr schedule's position, as DeepSpeed's own checkpoint (each
        rank writes its ZeRO shard) in ``<folder>/trainer_state``. The command returns, and
        the driver points state.json at the folder, only once every rank has written."""
        import json

        import torch.distributed as dist

        dist.barrier()                         # rank 0's HF folder is in place
        out = folder / TRAINER_STATE
        self.engine.save_checkpoint(str(out), tag="state", save_latest=False)
        if self.rank == 0:
            (out / "layout.json").write_text(json.dumps({"world": self.world, "zero_stage": self.engine.zero_optimization_stage()}))
        dist.barrier()

    def _load_trainer_state(self, folder: Path) -> None:
        """The optimizer state and lr schedule a checkpoint saved (``_save_trainer_state``), when
        it has them for this layout; otherwise they start afresh, said in the log."""
        import json

        out = folder / TRAINER_STATE
        layout_file = out / "layout.json"
        layout = json.loads(layout_file.read_text()) if layout_file.is_file() else None
        mine = {"world": self.world, "zero_stage": self.engine.zero_optimization_stage()}
        if layout != mine:
            if self.rank == 0:
                why = "it has none" if layout is None else f"it was saved by {layout}, this is {mine}"
                log.warning("resume from %s: the optimizer state and the lr schedule start afresh (%s)",
                            folder, why)
            return
        self.engine.load_checkpoint(str(out), tag="state", load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        if self.rank == 0:
            log.info("resumed the optimizer state and the lr schedule (step %d) from %s",
                     self.scheduler.last_epoch, out)


def save_hf_folder(folder: Path, state_dict: dict, hf_config: Any, tokenizer: Any, model_path: Path) -> Path:
    """Write a checkpoint as an HF folder (``model.safetensors``, config, tokenizer, the source's
    generation config) durably: into a fresh ``<folder>.tmp`` (a stale one from a crash is
    deleted, never reused), fsynced, then renamed onto ``folder`` — so a pointer written after
    this returns (state.json) never names a partial checkpoint."""
    from safetensors.torch import save_file

    from searche1_ray.durable import durable_folder

    with durable_folder(folder) as tmp:
        save_file(state_dict, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        gen = Path(model_path) / "generation_config.json"
        if gen.is_file():
            (tmp / gen.name).write_bytes(gen.read_bytes())
    return folder
