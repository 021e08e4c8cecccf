"""bench.train_layout's MFU arithmetic: FLOPs per token against the formula written out, and the
matmul peak it divides by."""

import math

import torch

from bench.train_layout import flops_per_token, matmul_peak


def test_flops_per_token_is_6n_plus_attention():
    # 6·N + 12·L·d·s with N = 135M, 30 layers, d = 576, s = 700: the ~0.95 GFLOP issue 18 quotes
    assert flops_per_token(134_515_008, 30, 576, 700) == 6 * 134_515_008 + 12 * 30 * 576 * 700
    assert abs(flops_per_token(134_515_008, 30, 576, 700) / 1e9 - 0.952) < 1e-3


def test_matmul_peak_is_a_rate_and_restores_threads():
    threads = torch.get_num_threads()
    peak = matmul_peak(torch.float32, 1, n=128, repeats=2)
    assert math.isfinite(peak) and peak > 1e6
    assert torch.get_num_threads() == threads
