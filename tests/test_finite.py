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


def test_a_parameter_that_requires_grad_is_screened_too():
    w = torch.nn.Parameter(torch.randn(4, 5))
    assert all_finite(w) and all_finite(w[1:3]) and all_finite(w.t())
    with torch.no_grad():
        w[2, 3] = float("nan")
    assert not all_finite(w) and not all_finite(w[2:])


def test_integers_are_finite():
    assert all_finite(torch.arange(5)) and all_finite(torch.zeros(3, dtype=torch.uint8))


def _kernel():
    import deltawise.io.finite as finite

    if finite._kernels is None:
        pytest.skip("deltawise._fused is not built")
    return finite._kernels


@pytest.mark.parametrize("dtype, code", [(torch.bfloat16, 1), (torch.float16, 2)])
def test_kernel_counts_every_16_bit_pattern_as_isfinite_does(dtype, code):
    """All 65536 bit patterns: the exponent test of _fused_finite.c against torch.isfinite, count and verdict."""
    kernel = _kernel()
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    expected = int((~torch.isfinite(every)).sum())
    assert expected == 2 * (128 if dtype == torch.bfloat16 else 1024)  # NaNs and two infinities, both signs
    assert kernel.nonfinite(every.view(torch.uint8).numpy(), code) == expected
    for value in every[~torch.isfinite(every)][::97]:  # one bad entry at a block edge, in a finite tensor
        for n, pos in ((4096, 4095), (4097, 4096), (8193, 0), (12_289, 12_288)):
            x = torch.ones(n, dtype=dtype)
            x[pos] = value
            assert kernel.nonfinite(x.view(torch.uint8).numpy(), code) == 1 and not all_finite(x)


def test_kernel_on_float32_bit_patterns_and_bad_buffers():
    kernel = _kernel()
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31 - 1, (100_003,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)  # about 1 in 256 random patterns has an all-ones exponent
    assert kernel.nonfinite(x.view(torch.uint8).numpy(), 0) == int((~torch.isfinite(x)).sum()) > 0
    assert all_finite(x) is False and all_finite(x[torch.isfinite(x)]) is True
    with pytest.raises(ValueError, match="whole number"):
        kernel.nonfinite(bytearray(7), 0)
    with pytest.raises(ValueError, match="dtype code"):
        kernel.nonfinite(bytearray(8), 5)


def test_torch_fallback_gives_the_kernels_verdicts(monkeypatch):
    """Without the extension (no compiler at install) the aminmax/sum screen decides the same way."""
    import deltawise.io.finite as finite

    gen = torch.Generator().manual_seed(2)
    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(5000, generator=gen).to(dtype)
        for value in (None, float("nan"), float("-inf")):
            y = x.clone()
            if value is not None:
                y[4321] = value
            cases.append(y)
    with_kernel = [all_finite(c) for c in cases]
    monkeypatch.setattr(finite, "_kernels", None)
    assert [all_finite(c) for c in cases] == with_kernel == [True, False, False] * 3


def test_baseline_copy_of_the_screen_counts_alike():
    """The kernel's baseline copy (CPUs without AVX2; DELTAWISE_FUSED_NO_SIMD=1) against the one that runs here."""
    import os
    import subprocess
    import sys

    kernel = _kernel()
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    here = [kernel.nonfinite(every.view(torch.uint8).numpy(), code) for code in (0, 1, 2)]
    code = ("import torch; from deltawise import _fused as k; e = torch.arange(65536, dtype=torch.int32).to(torch.int16)\n"
            "print(k.path, [k.nonfinite(e.view(torch.uint8).numpy(), c) for c in (0, 1, 2)])")
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DELTAWISE_FUSED_NO_SIMD="1"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split(None, 1) == ["baseline", f"{here}\n"]
