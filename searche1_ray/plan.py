"""Resolve a config into the exact Ray resources a run would request, and check they fit a cluster.

One entry per component, each with its placement-group bundles and the options handed to Ray:

    rollout    num_workers x placement group of tensor_parallel_size bundles
               {CPU: num_cpus_per_worker, GPU: num_gpus_per_worker}, STRICT_PACK (TP ranks on one
               node); a worker therefore holds tp x num_gpus_per_worker GPUs
    train      Ray Train ScalingConfig(num_workers, use_gpu, resources_per_worker={CPU, GPU:
               train.gpus_per_worker if use_gpu}), placement strategy PACK; DeepSpeed ZeRO stage
               from train.zero_stage
    retriever  Serve deployment, ray_actor_options {num_cpus, num_gpus} per replica, autoscaling
               min_replicas..max_replicas; faiss-gpu shards the index over the replica's GPUs
    driver     the SelfEvolutionDriver actor: num_cpus=0 (it only coordinates)

Totals are given at the minimum and the maximum retriever replica count. ``check_fits`` packs the
bundles onto ``cluster.num_gpus / gpus_per_node`` nodes (first fit, largest first; a STRICT_PACK
group on one node) and reports what does not fit. Nothing here starts Ray.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from searche1_ray.config import Config
from searche1_ray.hardware import resolve_bf16


class PlanError(ValueError):
    """The resource plan cannot run on the given cluster."""


@dataclass
class ComponentPlan:
    name: str                          # rollout | train | retriever | driver
    count: int                         # instances at start (workers / replicas)
    max_count: int                     # instances at most (autoscaling)
    bundles: list[dict[str, float]]    # one instance's placement-group bundles
    strategy: str                      # placement-group strategy of one instance
    ray_options: dict[str, Any]        # what is handed to Ray for this component
    notes: str = ""

    def per_instance(self, resource: str) -> float:
        return sum(b.get(resource, 0.0) for b in self.bundles)

    def total(self, resource: str, at_max: bool = False) -> float:
        return (self.max_count if at_max else self.count) * self.per_instance(resource)


@dataclass
class ResourcePlan:
    components: list[ComponentPlan]
    cluster: dict[str, int]
    facts: dict[str, Any] = field(default_factory=dict)   # model, engine and index settings shown

    def component(self, name: str) -> ComponentPlan:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def totals(self, at_max: bool = False) -> dict[str, float]:
        return {r: _round(sum(c.total(r, at_max) for c in self.components)) for r in ("CPU", "GPU")}

    def to_dict(self) -> dict[str, Any]:
        return {"components": [asdict(c) for c in self.components], "cluster": self.cluster,
                "totals": {"min": self.totals(False), "max": self.totals(True)}, "facts": self.facts,
                "problems": fit_problems(self)}

    def to_text(self) -> str:
        return format_plan(self)


def _round(x: float) -> float:
    return float(round(x, 6))


def _bundle(cpu: float, gpu: float) -> dict[str, float]:
    b = {"CPU": _round(cpu)}
    if gpu > 0:
        b["GPU"] = _round(gpu)
    return b


# --- per-component options (what the actors / Train / Serve code passes to Ray) --------------

def rollout_worker_bundles(cfg: Config) -> list[dict[str, float]]:
    """Placement-group bundles of one rollout worker: one per tensor-parallel rank."""
    r = cfg.rollout
    return [_bundle(r.num_cpus_per_worker, r.num_gpus_per_worker)
            for _ in range(r.tensor_parallel_size)]


def rollout_placement_group(cfg: Config) -> dict[str, Any] | None:
    """tp > 1: the placement group one RolloutWorker needs (``ray.util.placement_group(**this)``;
    the actor goes in bundle 0, vLLM's Ray executor puts one rank in each bundle). tp == 1: None."""
    if cfg.rollout.tensor_parallel_size == 1:
        return None
    return {"bundles": rollout_worker_bundles(cfg), "strategy": "STRICT_PACK"}


def rollout_worker_options(cfg: Config) -> dict[str, Any]:
    """Options of one RolloutWorker: ``num_cpus`` / ``num_gpus`` for ``.options()``, and with
    tp > 1 also ``placement_group`` ({bundles, strategy}), ``placement_group_bundle_index`` (0)
    and ``vllm`` (engine arguments), which the caller pops before ``.options()`` (it creates the
    placement group and passes the engine arguments to vLLM). With tp > 1 the actor holds no
    GPU itself: the tp engine ranks hold them, one per bundle."""
    r = cfg.rollout
    tp = r.tensor_parallel_size
    opts: dict[str, Any] = {"num_cpus": r.num_cpus_per_worker,
                            "num_gpus": r.num_gpus_per_worker if tp == 1 else 0}
    if tp > 1:
        opts.update(placement_group=rollout_placement_group(cfg), placement_group_bundle_index=0,
                    vllm=rollout_engine_args(cfg))
    return opts


def rollout_engine_args(cfg: Config) -> dict[str, Any]:
    """vLLM engine arguments that follow from the plan (``build_llm(extra=...)``)."""
    r = cfg.rollout
    args: dict[str, Any] = {"tensor_parallel_size": r.tensor_parallel_size}
    if r.tensor_parallel_size > 1:
        args["distributed_executor_backend"] = "ray" if r.num_gpus_per_worker > 0 else "mp"
    return args


def train_scaling_config(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``ray.train.ScalingConfig`` for the GRPO / OPSD / warm-start workers
    (``training.runner.TrainRunner`` passes exactly these)."""
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = float(t.gpus_per_worker)
    return {"num_workers": t.num_workers, "use_gpu": t.use_gpu,
            "resources_per_worker": resources, "placement_strategy": "PACK"}


def retriever_deployment_options(cfg: Config | Any) -> dict[str, Any]:
    """Keyword arguments of the retriever's ``Retriever.options`` (``actors.retriever.retriever_app``
    passes exactly these): per-replica actor resources and autoscaling. Takes the config or its
    ``retriever`` section."""
    r = getattr(cfg, "retriever", cfg)
    return {"ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
            "max_ongoing_requests": max(2 * r.max_batch_size, 8),
            "autoscaling_config": {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                                   "initial_replicas": r.min_replicas,
                                   "target_ongoing_requests": max(1, r.max_batch_size)}}


# --- the plan ------------------------------------------------------------------------------

def _index_facts(cfg: Config) -> dict[str, Any]:
    r = cfg.retriever
    facts = {"encoder": r.encoder, "index_type": r.index_type, "topk": r.topk,
             "faiss": ("GPU" if r.faiss_gpu else "CPU")}
    if r.faiss_gpu:
        shards = max(1, int(r.num_gpus)) if r.num_gpus >= 1 else 1
        facts["faiss"] = f"GPU, fp16, {'sharded over ' + str(shards) + ' GPUs' if shards > 1 else 'one GPU'} per replica"
    if r.faiss_index_path:
        facts["faiss_index_path"] = r.faiss_index_path
    return facts


def resource_plan(cfg: Config) -> ResourcePlan:
    """The Ray resources ``cfg`` would request, per component, with totals."""
    r, t, ret = cfg.rollout, cfg.train, cfg.retriever
    tp = r.tensor_parallel_size
    rollout_gpu = r.num_gpus_per_worker > 0
    rollout = ComponentPlan(
        name="rollout", count=r.num_workers, max_count=r.num_workers,
        bundles=rollout_worker_bundles(cfg), strategy="STRICT_PACK" if tp > 1 else "actor",
        ray_options={"actor": {k: rollout_worker_options(cfg)[k] for k in ("num_cpus", "num_gpus")},
                     "placement_group": rollout_placement_group(cfg),
                     "vllm": rollout_engine_args(cfg)},
        notes=(f"vLLM tensor_parallel_size={tp}, "
               + (f"gpu_memory_utilization={r.gpu_memory_utilization}" if rollout_gpu
                  else f"CPU, KV cache {r.kv_cache_gib} GiB")
               + f", {r.questions_per_batch} questions/batch"))
    train = ComponentPlan(
        name="train", count=t.num_workers, max_count=t.num_workers,
        bundles=[dict(train_scaling_config(cfg)["resources_per_worker"])], strategy="PACK",
        ray_options={"ScalingConfig": train_scaling_config(cfg)},
        notes=(f"DeepSpeed ZeRO-{t.zero_stage}, "
               f"{'bf16' if resolve_bf16(t.bf16, t.use_gpu) else 'fp32'}{' (auto)' if t.bf16 == 'auto' else ''}"
               + (", gradient checkpointing" if t.gradient_checkpointing else "")
               + ("" if t.use_gpu else ", gloo on CPU")))
    retriever = ComponentPlan(
        name="retriever", count=ret.min_replicas, max_count=ret.max_replicas,
        bundles=[_bundle(ret.num_cpus, ret.num_gpus)], strategy="replica",
        ray_options=retriever_deployment_options(cfg),
        notes=f"encoder {ret.encoder}, FAISS {ret.index_type} on {'GPU' if ret.faiss_gpu else 'CPU'}")
    driver = ComponentPlan(name="driver", count=1, max_count=1, bundles=[{"CPU": 0.0}], strategy="actor",
                           ray_options={"num_cpus": 0}, notes="SelfEvolutionDriver (coordination only)")
    c = cfg.cluster
    facts = {"model": cfg.model.name, "dtype": cfg.model.dtype, **_index_facts(cfg)}
    return ResourcePlan([rollout, train, retriever, driver],
                        {"num_gpus": c.num_gpus, "num_cpus": c.num_cpus, "gpus_per_node": c.gpus_per_node},
                        facts)


# --- fitting -------------------------------------------------------------------------------

def _nodes(cluster: dict[str, int]) -> list[dict[str, float]] | None:
    gpus, cpus, per_node = cluster["num_gpus"], cluster["num_cpus"], cluster["gpus_per_node"]
    if not gpus and not cpus:
        return None
    if gpus and per_node:
        n = max(1, math.ceil(gpus / per_node))
        return [{"GPU": float(min(per_node, gpus - i * per_node)),
                 "CPU": float(cpus) / n if cpus else math.inf} for i in range(n)]
    return [{"GPU": float(gpus) if gpus else 0.0, "CPU": float(cpus) if cpus else math.inf}]


def fit_problems(plan: ResourcePlan, at_max: bool = True) -> list[str]:
    """Why ``plan`` (at the maximum replica counts) would not fit its cluster; [] when it fits or
    the cluster is unknown (cluster.num_gpus = num_cpus = 0)."""
    problems: list[str] = []
    cl = plan.cluster
    totals = plan.totals(at_max)
    if cl["num_gpus"] == 0 and totals["GPU"] > 0 and cl["num_cpus"]:
        problems.append(f"the plan asks for {totals['GPU']:g} GPUs but cluster.num_gpus is 0")
    if cl["num_gpus"] and totals["GPU"] > cl["num_gpus"] + 1e-9:
        parts = ", ".join(f"{c.name} {c.total('GPU', at_max):g}"
                          for c in plan.components if c.total("GPU", at_max))
        problems.append(f"GPUs: the plan asks for {totals['GPU']:g} ({parts}) "
                        f"but cluster.num_gpus is {cl['num_gpus']}")
    if cl["num_cpus"] and totals["CPU"] > cl["num_cpus"] + 1e-9:
        problems.append(f"CPUs: the plan asks for {totals['CPU']:g} but cluster.num_cpus is {cl['num_cpus']}")
    if problems:
        return problems
    nodes = _nodes(cl)
    if nodes is None:
        return []
    # first fit, largest group first; a STRICT_PACK group must land on one node
    groups: list[tuple[str, list[dict[str, float]]]] = []
    for c in plan.components:
        n = c.max_count if at_max else c.count
        for i in range(n):
            if c.strategy == "STRICT_PACK":
                groups.append((f"{c.name}[{i}]", c.bundles))
            else:
                groups.extend((f"{c.name}[{i}]", [b]) for b in c.bundles)
    groups.sort(key=lambda g: -sum(b.get("GPU", 0.0) for b in g[1]))
    free = [dict(n) for n in nodes]
    for label, bundles in groups:
        need_gpu = sum(b.get("GPU", 0.0) for b in bundles)
        need_cpu = sum(b.get("CPU", 0.0) for b in bundles)
        for node in free:
            if node["GPU"] + 1e-9 >= need_gpu and node["CPU"] + 1e-9 >= need_cpu:
                node["GPU"] -= need_gpu
                node["CPU"] -= need_cpu
                break
        else:
            problems.append(f"{label} needs {need_gpu:g} GPU + {need_cpu:g} CPU on one node; "
                            f"no node of {cl['gpus_per_node'] or cl['num_gpus']} GPUs has that left")
    return problems


def check_fits(plan: ResourcePlan, at_max: bool = True) -> ResourcePlan:
    """Raise ``PlanError`` listing every reason the plan does not fit its cluster."""
    problems = fit_problems(plan, at_max)
    if problems:
        raise PlanError("plan: does not fit the cluster:\n  - " + "\n  - ".join(problems)
                        + "\nChange rollout.num_workers / tensor_parallel_size, train.num_workers, "
                          "retriever.max_replicas / num_gpus, or the cluster section.")
    return plan


def _fmt_bundles(bundles: list[dict[str, float]]) -> str:
    def one(b: dict[str, float]) -> str:
        return "{" + ", ".join(f"{k}: {v:g}" for k, v in b.items()) + "}"
    if len(bundles) > 1 and all(b == bundles[0] for b in bundles):
        return f"{len(bundles)} x {one(bundles[0])}"
    return " + ".join(one(b) for b in bundles)


def format_plan(plan: ResourcePlan) -> str:
    """A human-readable table of the plan (printed by ``jobs.evaluate --dry-run``)."""
    lines = [f"Resource plan — model {plan.facts.get('model')} ({plan.facts.get('dtype')}), "
             f"retriever {plan.facts.get('encoder')} / FAISS {plan.facts.get('index_type')} "
             f"({plan.facts.get('faiss')})", "",
             f"{'component':<10} {'instances':>9}  {'per-instance bundles':<36} {'GPU':>6} {'CPU':>7}  notes",
             "-" * 106]
    for c in plan.components:
        inst = f"{c.count}" if c.count == c.max_count else f"{c.count}..{c.max_count}"
        bundles = _fmt_bundles(c.bundles) + (" STRICT_PACK" if c.strategy == "STRICT_PACK" else "")
        gpu = f"{c.total('GPU'):g}" + ("" if c.count == c.max_count else f"..{c.total('GPU', True):g}")
        cpu = f"{c.total('CPU'):g}" + ("" if c.count == c.max_count else f"..{c.total('CPU', True):g}")
        lines.append(f"{c.name:<10} {inst:>9}  {bundles:<36} {gpu:>6} {cpu:>7}  {c.notes}")
    lo, hi = plan.totals(False), plan.totals(True)
    lines.append("-" * 106)
    gpu = f"{lo['GPU']:g}" + ("" if lo == hi else f"..{hi['GPU']:g}")
    cpu = f"{lo['CPU']:g}" + ("" if lo == hi else f"..{hi['CPU']:g}")
    lines.append(f"{'total':<10} {'':>9}  {'':<36} {gpu:>6} {cpu:>7}")
    cl = plan.cluster
    if cl["num_gpus"] or cl["num_cpus"]:
        problems = fit_problems(plan)
        where = (f"cluster: {cl['num_gpus']} GPUs" + (f" ({cl['gpus_per_node']}/node)" if cl["gpus_per_node"] else "")
                 + (f", {cl['num_cpus']} CPUs" if cl["num_cpus"] else ""))
        lines.append(f"{where} — " + ("fits (at the maximum replica counts)" if not problems
                                      else "DOES NOT FIT:\n  - " + "\n  - ".join(problems)))
    else:
        lines.append("cluster: unknown (set cluster.num_gpus / num_cpus to check the fit)")
    lines.append("")
    lines.append("Ray options:")
    lines.append(f"  rollout worker : {json.dumps(plan.component('rollout').ray_options)}")
    lines.append(f"  train          : ScalingConfig({json.dumps(plan.component('train').ray_options['ScalingConfig'])})")
    lines.append(f"  retriever      : serve.deployment({json.dumps(plan.component('retriever').ray_options)})")
    return "\n".join(lines)
