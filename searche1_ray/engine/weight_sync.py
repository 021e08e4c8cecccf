"""Trainer → rollout-engine weight broadcast over a private torch process group (NCCL or gloo).

The GPU path of weight sync, as OpenRLHF / verl do it: trainer rank 0 and every inference
engine join one extra process group (rank 0 = trainer, ranks 1..N = engines) that lives beside
each side's own default group, rendezvousing through a TCPStore that rank 0 hosts. Per update,
rank 0 broadcasts each tensor of the HF-named state dict; each engine receives into an empty
tensor of the announced shape/dtype and streams it into ``reload_weights`` (one tensor in
flight, so no second copy of the model is ever held).

``backend="nccl"`` on GPUs (tensors on ``cuda``), ``backend="gloo"`` on CPU — the same code, so
the CPU test exercises the protocol the GPU cluster runs. Torch only: no Ray or vLLM here.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

_PREFIX = "searche1-weights"


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to allocate one broadcast tensor."""
    name: str
    dtype: str        # "bfloat16", "float32", ...
    shape: tuple[int, ...]


def tensor_meta(state_dict: Mapping[str, torch.Tensor]) -> list[TensorMeta]:
    """The broadcast order and layout of ``state_dict`` (sent to the engines ahead of the data)."""
    return [TensorMeta(k, str(v.dtype).removeprefix("torch."), tuple(v.shape))
            for k, v in state_dict.items()]


def open_group(master_address: str, master_port: int, rank: int, world_size: int,
               backend: str = "gloo", timeout_s: float = 600.0) -> "WeightGroup":
    """Join the weight-sync group. Rank 0 (the trainer) hosts the TCPStore; the others connect.
    Every rank must call this at about the same time (the constructor blocks until all joined).
    Returns a :class:`WeightGroup` usable with :func:`broadcast_state_dict` /
    :func:`receive_state_dict`; it does not touch (or need) the default process group."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight sync: backend must be 'gloo' or 'nccl', got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"weight sync: rank {rank} outside world_size {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, rank == 0, timeout=timeout,
                          wait_for_workers=False)
    store = dist.PrefixStore(_PREFIX, store)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    else:  # pragma: no cover - needs GPUs
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
    return WeightGroup(pg, store, backend, rank, world_size)


@dataclass
class WeightGroup:
    """A joined weight-sync group; it holds the store, so rank 0's server lives as long."""
    pg: Any
    store: Any
    backend: str
    rank: int
    world_size: int

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":  # pragma: no cover - needs GPUs
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _broadcast(group: WeightGroup, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.pg.broadcast([tensor], opts).wait()


def broadcast_state_dict(group: WeightGroup, state_dict: Mapping[str, torch.Tensor]) -> int:
    """Rank 0: send every tensor, in ``tensor_meta(state_dict)`` order. Returns bytes sent."""
    dev = group.device
    sent = 0
    for t in state_dict.values():
        t = t.detach().to(dev).contiguous()
        _broadcast(group, t)
        sent += t.numel() * t.element_size()
    return sent


def receive_state_dict(group: WeightGroup, metas: list) -> Iterator[tuple[str, torch.Tensor]]:
    """Ranks ≥ 1: yield ``(name, tensor)`` as each broadcast arrives (lazy: feed it straight into
    a weight loader). The caller must exhaust the iterator, or the group deadlocks."""
    dev = group.device
    for m in metas:
        if not isinstance(m, TensorMeta):  # plain [name, dtype, shape] (RPC-friendly form)
            m = TensorMeta(str(m[0]), str(m[1]), tuple(int(x) for x in m[2]))
        t = torch.empty(tuple(m.shape), dtype=getattr(torch, m.dtype), device=dev)
        _broadcast(group, t)
        yield m.name, t
