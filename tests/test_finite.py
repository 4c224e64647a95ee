"""The NaN/inf screen (deltawise.io.finite.all_finite): every dtype path against torch.isfinite entry by entry."""

from __future__ import annotations

import pytest
import torch

from deltawise.io.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite_wherever_the_bad_entry_is(dtype):
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 64, 4099, 100_003):  # vector widths, tails, several threads' blocks
        x = torch.randn(n, generator=gen).to(dtype)
        assert all_finite(x)
        for value in (float("nan"), float("inf"), float("-inf")):
            for pos in {0, n // 2, n - 1}:
                y = x.clone()
                y[pos] = value
                assert not all_finite(y), (dtype, n, value, pos)
                assert not all_finite(y.view(1, -1).t()[::1])  # a strided view of the same entries
    big = torch.full((8,), torch.finfo(dtype).max, dtype=dtype)  # finite entries whose float32 sum overflows
    assert all_finite(big) and not all_finite(torch.cat([big, torch.tensor([float("nan")], dtype=dtype)]))
    assert all_finite(torch.empty(0, dtype=dtype)) and not all_finite(torch.tensor(float("inf"), dtype=dtype))


def test_integers_are_finite():
    assert all_finite(torch.arange(5)) and all_finite(torch.zeros(3, dtype=torch.uint8))
