"""DeepSpeed config generated from ours: ZeRO-2 on CPU (gloo), ZeRO-3 + bf16 on GPU.

The optimizer and LR schedule are *not* named here: the runner passes a ``torch.optim.AdamW``
object and a ``LambdaLR`` to ``deepspeed.initialize`` (naming "AdamW" in the config makes
DeepSpeed JIT-compile its fused CPU Adam, ~95 s on a 2-core machine — MEASURED.md).
Gradient accumulation is driven by the runner (``set_gradient_accumulation_boundary``), so the
config says one micro-batch per step; the runner scales each micro-batch's loss itself.
"""

from __future__ import annotations

from typing import Any

from searche1_ray.config import TrainConfig
from searche1_ray.hardware import resolve_bf16


def deepspeed_config(train: TrainConfig, grad_clip: float, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for a run of ``train.num_workers`` ranks.

    CPU: ZeRO stage ``train.zero_stage`` (2 by default; optimizer states and gradients
    partitioned over ranks, full bf16 parameters on each rank; 3 runs on CPU too, over gloo),
    fp32 gradient communication (gloo reduces bf16 slowly and less exactly). GPU: ZeRO-3
    (parameters partitioned too; gathered for weight export and the lean OPSD loss's LM head:
    ``tasks.full_parameters``) with bf16.
    """
    stage = train.zero_stage
    bf16 = resolve_bf16(train.bf16, train.use_gpu)
    if train.use_gpu:
        stage = 3 if stage >= 2 else stage
        bf16 = True
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": int(5e7),
        "allgather_bucket_size": int(5e7),
    }
    if stage == 3:
        zero.update({
            "stage3_gather_16bit_weights_on_model_save": True,
            "stage3_param_persistence_threshold": int(1e5),
            "stage3_prefetch_bucket_size": int(5e7),
        })
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": train.micro_batch_size * world_size,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not train.use_gpu:
        cfg["communication_data_type"] = "fp32"
    return cfg
