"""The CPU live-tensor tracker that --validate measures peak memory with."""

import torch

from nat_megatron.tune.measure import LiveTensorBytes


def test_tracks_storages_saved_by_autograd_and_their_release():
    mode = LiveTensorBytes()
    n = 1 << 18  # 1 MiB of fp32
    with mode:
        x = torch.randn(n, requires_grad=True)
        y = (x * 2).exp()  # the product dies at once; exp's output is saved for its backward
        assert mode.current == 2 * 4 * n
        assert mode.peak == 3 * 4 * n
        view = y[: n // 2]  # a view adds no storage
        assert mode.current == 2 * 4 * n
        y.sum().backward()  # backward: x.grad (+ transient grads)
        del y, view
        assert mode.current == 2 * 4 * n  # x and x.grad
        mode.reset_peak()
        assert mode.peak == 2 * 4 * n
