"""The trainer → engine broadcast protocol (engine/weight_sync.py) on gloo, two ranks in one
process (threads), and the CPU slot plan that keeps two engines on one node apart."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from searche1_ray.engine import weight_sync


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_broadcast_delivers_every_tensor_bit_exact():
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
          "b.bias": torch.randn(3, generator=g),
          "c.int": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    metas = weight_sync.tensor_meta(sd)
    assert [(m.name, m.dtype, m.shape) for m in metas] == [
        ("a.weight", "bfloat16", (7, 5)), ("b.bias", "float32", (3,)), ("c.int", "int64", (2, 3))]
    port, got = _port(), {}

    def engine(rank):
        pg = weight_sync.open_group("127.0.0.1", port, rank, 3, "gloo", timeout_s=60)
        got[rank] = dict(weight_sync.receive_state_dict(pg, metas))

    threads = [threading.Thread(target=engine, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    pg0 = weight_sync.open_group("127.0.0.1", port, 0, 3, "gloo", timeout_s=60)
    sent = weight_sync.broadcast_state_dict(pg0, sd)
    for t in threads:
        t.join(timeout=60)
    assert sent == 7 * 5 * 2 + 3 * 4 + 6 * 8
    for rank in (1, 2):
        assert list(got[rank]) == list(sd)
        for k, v in sd.items():
            assert got[rank][k].dtype == v.dtype and torch.equal(got[rank][k], v)


def test_open_group_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        weight_sync.open_group("127.0.0.1", 1, 0, 2, backend="mpi")
    with pytest.raises(ValueError, match="rank 2"):
        weight_sync.open_group("127.0.0.1", 1, 2, 2)


def test_cpu_slots_are_disjoint_when_cores_allow():
    pytest.importorskip("vllm")
    from searche1_ray.engine.vllm_engine import cpu_slot
    assert cpu_slot(0, 2, [0, 1]) == [0, 1]
    assert [cpu_slot(i, 1, [0, 1]) for i in range(2)] == [[0], [1]]
    assert [cpu_slot(i, 2, range(8)) for i in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert cpu_slot(2, 1, [0, 1]) == [0]           # more engines than cores: wrap, evenly
    assert cpu_slot(0, 4, [0, 1]) == [0, 1]        # never more threads than cores
