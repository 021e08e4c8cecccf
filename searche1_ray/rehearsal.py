"""The paper recipe at rehearsal size: every override of ``configs/paper_qwen2.5_3b.yaml`` that a
small run of one full cycle (GRPO → OPSD with validation → merge → seven-dataset evaluation)
needs, in one place, so a reader sees exactly what differs from the GPU run.

Two placements share the sizes:
- ``gpus=0``: the CPU dress rehearsal (tests/integration/test_paper_recipe.py): one vLLM worker
  on CPU, two gloo train ranks, ZeRO-3 kept, fp32 where the CPU has no bf16;
- ``gpus>=1``: ``python -m jobs.gpu_check``: the same cycle on the GPU code paths (vLLM on CUDA,
  faiss-gpu, ZeRO-3 in bf16 on NCCL). On one GPU the engine, the train rank and the retriever
  share it (fractions of it as Ray resources; the engine's memory share set to match).

Nothing here starts anything.
"""

from __future__ import annotations

from pathlib import Path

# sizes: 1 GRPO step of 2 questions (G = 5 kept: 10 sequences in 2 mini-batches of 5), an OPSD
# pool of 6 questions, 2 LoRA steps validated at 0 and 2 on the 4 held out of training, the whole
# test set (the tiny world's, over the seven dataset names)
SIZES = [
    "run.cycles=1",
    "grpo.steps_per_round=1", "grpo.questions_per_step=2", "grpo.mini_batch_size=5",
    "grpo.checkpoint_every=1", "grpo.lr=1e-5",
    "rollout.max_turn_tokens=64", "rollout.max_response_tokens=384", "rollout.max_information_tokens=200",
    "rollout.questions_per_batch=16", "train.max_seq_len=768",
    "opsd.questions_per_round=6", "opsd.samples_per_question=3", "opsd.steps=2", "opsd.batch_size=2",
    "opsd.eval_every=2", "opsd.lr=1e-3",
    "data.dev_from_train=4", "eval.limit=0",
]


def rehearsal_overrides(data: str | Path, model: str | Path, out: str | Path, port: int,
                        gpus: int = 0) -> list[str]:
    """The paper config's overrides for a rehearsal-size run of ``model`` on the published-layout
    folder ``data`` (``searche1_ray.data.published_layout``), the run under ``out``, the retriever's
    HTTP on ``port``; on CPU (``gpus=0``) or on ``gpus`` local GPUs."""
    data = Path(data)
    common = [
        # where: a private local Ray on 127.0.0.1, the run under ``out``
        f"run.output_dir={out}", "run.name=rehearsal", "run.ray_address=", "run.dashboard=false",
        # what: the given model instead of Qwen2.5-3B (dtype as the hardware allows); the tiny
        # world's files in the published layout instead of /data/search-r1; MiniLM over its
        # corpus instead of E5 over wiki-18
        f"model.name={model}", "model.dtype=auto",
        f"data.dir={data}", f"data.train_path={data / 'nq_hotpotqa_train' / 'train.parquet'}",
        f"data.test_path={data / 'nq_hotpotqa_train' / 'test.parquet'}",
        f"data.corpus_path={data / 'wiki-18.jsonl'}",
        "retriever.encoder=minilm", "retriever.faiss_index_path=", f"retriever.port={port}",
        f"retriever.index_dir={Path(out) / 'index'}",
    ]
    if gpus <= 0:
        placement = [
            "cluster.num_gpus=0", "cluster.gpus_per_node=0", "cluster.num_cpus=8",
            "retriever.faiss_gpu=false", "retriever.num_gpus=0", "retriever.num_cpus=0.5",
            # one vLLM worker, two gloo train ranks (ZeRO-3 kept), fp32 where no bf16
            "rollout.num_workers=1", "rollout.num_gpus_per_worker=0", "rollout.num_cpus_per_worker=1",
            "rollout.gpu_memory_utilization=0.9", "rollout.enforce_eager=true", "rollout.kv_cache_gib=1",
            "train.use_gpu=false", "train.num_workers=2", "train.cpus_per_worker=1", "train.bf16=auto",
            "train.gradient_checkpointing=false", "train.micro_batch_size=2",
        ]
    elif gpus == 1:
        placement = [
            "cluster.num_gpus=1", "cluster.gpus_per_node=1", "cluster.num_cpus=0",
            # one GPU shared: retriever 0.1 (faiss-gpu, fp16), engine 0.4 (35 % of its memory),
            # one train rank 0.5 (ZeRO-3 on one rank still partitions through DeepSpeed's code path)
            "retriever.faiss_gpu=true", "retriever.num_gpus=0.1", "retriever.num_cpus=1",
            "rollout.num_workers=1", "rollout.num_gpus_per_worker=0.4", "rollout.num_cpus_per_worker=1",
            "rollout.gpu_memory_utilization=0.35", "rollout.enforce_eager=true",
            "train.use_gpu=true", "train.num_workers=1", "train.gpus_per_worker=0.5", "train.cpus_per_worker=1",
            "train.bf16=true", "train.gradient_checkpointing=true", "train.micro_batch_size=2",
        ]
    else:
        # one GPU for the engine, the rest for train ranks (NCCL between whole GPUs); the
        # retriever shares the engine's GPU
        ranks = gpus - 1
        placement = [
            f"cluster.num_gpus={gpus}", f"cluster.gpus_per_node={gpus}", "cluster.num_cpus=0",
            "retriever.faiss_gpu=true", "retriever.num_gpus=0.1", "retriever.num_cpus=1",
            "rollout.num_workers=1", "rollout.num_gpus_per_worker=0.9", "rollout.num_cpus_per_worker=1",
            "rollout.gpu_memory_utilization=0.7", "rollout.enforce_eager=true",
            "train.use_gpu=true", f"train.num_workers={ranks}", "train.gpus_per_worker=1", "train.cpus_per_worker=1",
            "train.bf16=true", "train.gradient_checkpointing=true", "train.micro_batch_size=2",
        ]
    return common + placement + SIZES
