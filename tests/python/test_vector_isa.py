"""The CPU kernels built once per vector instruction set (csrc/ops/cpu/vector_isa.h).

On an AVX-512 CPU the per-element kernels and the fixed-order matrix products (channel
attention's MLP, self attention's projections and blocks) run their AVX-512 build; with
ATEN_CPU_CAPABILITY=avx2 (or on a CPU without AVX-512) their AVX2 build. Both must give the
same bits, so that results do not depend on the CPU; and no code outside the AVX-512 builds may
use AVX-512 instructions, or the library would fault on an AVX2-only CPU.
"""

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

import cnn_attention

ops = torch.ops.cnn_attention
X86 = platform.machine() in ("x86_64", "AMD64")

# Writes every result of the per-element kernels and of operators built on the fixed-order
# products, for fixed inputs, to sys.argv[1]; run here and in a process that
# ATEN_CPU_CAPABILITY=avx2 keeps on the AVX2 builds.
PER_ISA_RESULTS = r"""
import sys
import torch
import cnn_attention

ops = torch.ops.cnn_attention


def inputs(dtype, layout):
    g = torch.Generator().manual_seed(7)
    # A score per element of x: the per-element path, the one built per instruction set.
    # 3 * 5 * 7 * 11 elements per sample: no vector width divides a row, so the last partial
    # vector of each build is exercised; scores span sigmoid's saturation and its threshold.
    x = torch.randn(3, 5, 7, 11, generator=g, dtype=torch.float64)
    s = torch.randn(3, 5, 7, 11, generator=g, dtype=torch.float64) * 12
    s.view(-1)[::97] = 0.0
    s.view(-1)[5] = float("nan")
    s.view(-1)[6] = float("inf")
    s.view(-1)[7] = -float("inf")
    s.view(-1)[8] = 90.0
    s.view(-1)[9] = -90.0
    x.view(-1)[10] = float("nan")
    grad = torch.randn(3, 5, 7, 11, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return [t.to(dtype).contiguous(memory_format=fmt) for t in (x, s, grad)]


results = {"cpu_isa": cnn_attention.build_info()["cpu_isa"]}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for layout in ("contiguous", "channels_last"):
        x, s, grad = inputs(dtype, layout)
        for temperature in (1.0, 0.7):
            name = f"{dtype}-{layout}-T{temperature}"
            xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
            y = ops.soft_attention(xr, sr, "sigmoid", temperature)
            y.backward(grad)
            results[f"soft-{name}"] = (y.detach(), xr.grad, sr.grad)
            for estimator in ("sigmoid", "identity"):
                xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
                y, mask = ops.hard_attention(xr, sr, "threshold", 0.3, 1, estimator, temperature)
                y.backward(grad)
                results[f"hard-{estimator}-{name}"] = (y.detach(), mask, xr.grad, sr.grad)
            # A softmax over positions per score channel: its exponentials are the per-ISA
            # kernel's, summed (and used) by the AVX2 code; rows of 77 positions, NaN and
            # infinities among the scores (whole rows NaN) and saturated rows.
            xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
            y = ops.soft_attention(xr, sr, "softmax", temperature)
            y.backward(grad)
            results[f"softmax-{name}"] = (y.detach(), xr.grad, sr.grad)
            xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
            pooled = ops.soft_attention_pool(xr, sr, temperature)
            pooled.backward(grad.sum((2, 3)))
            results[f"pool-{name}"] = (pooled.detach(), xr.grad, sr.grad)


def trained(name, module, x):
    # Forward and backward of a module whose products are the fixed-order ones; widths below,
    # between and at multiples of both vector widths.
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype))
    results[name] = (y.detach(), x.grad, *[p.grad for p in module.parameters()])


for dtype in (torch.float32, torch.float64):
    # P = 19 * 23 positions: no block size divides it. Head widths 14 and 8, values 56 and 64.
    for channels, qk_reduction in ((56, 4), (64, 8)):
        torch.manual_seed(3)
        module = cnn_attention.SelfAttention(channels, qk_reduction=qk_reduction, gamma_init=0.5)
        x = torch.randn(2, channels, 19, 23, generator=torch.Generator().manual_seed(4))
        trained(f"self-{dtype}-{channels}", module.to(dtype), x.to(dtype))
    torch.manual_seed(3)
    module = cnn_attention.ChannelAttention(72, reduction=4, pool="avgmax")
    x = torch.randn(5, 72, 9, 7, generator=torch.Generator().manual_seed(4))
    trained(f"channel-{dtype}", module.to(dtype), x.to(dtype))
    # Three samples: the MLP's forward products are three columns wide, at most half an
    # AVX-512 vector of either dtype (the AVX-512 build's 256-bit tiles).
    torch.manual_seed(3)
    module = cnn_attention.ChannelAttention(72, reduction=4, pool="avg")
    x = torch.randn(3, 72, 9, 7, generator=torch.Generator().manual_seed(4))
    trained(f"channel-avg-{dtype}", module.to(dtype), x.to(dtype))
torch.save(results, sys.argv[1])
"""


def _per_isa_results(tmp_path, name, env):
    path = tmp_path / f"{name}.pt"
    out = subprocess.run([sys.executable, "-c", PER_ISA_RESULTS, str(path)], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return torch.load(path)


@pytest.mark.skipif(not X86, reason="per-ISA builds exist on x86-64 only")
def test_build_info_names_the_builds_and_the_one_in_use():
    info = cnn_attention.build_info()
    assert info["cpu_isas"] == ["AVX2", "AVX512"]
    # The library follows ATen's choice for its own kernels.
    expected = "AVX512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "AVX2"
    assert info["cpu_isa"] == expected


@pytest.mark.skipif(not X86 or torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="needs a CPU where the AVX-512 build runs")
def test_the_avx512_builds_give_the_bits_of_the_avx2_builds(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(cnn_attention.__file__)))
    env.pop("ATEN_CPU_CAPABILITY", None)
    wide = _per_isa_results(tmp_path, "avx512", env)
    narrow = _per_isa_results(tmp_path, "avx2", dict(env, ATEN_CPU_CAPABILITY="avx2"))
    assert wide.pop("cpu_isa") == "AVX512"
    assert narrow.pop("cpu_isa") == "AVX2"
    assert wide.keys() == narrow.keys() and len(wide) == 4 * 2 * 2 * 5 + 2 * 4
    for key in wide:
        for a, b in zip(wide[key], narrow[key]):
            assert a.dtype == b.dtype and a.stride() == b.stride(), key
            # Bit for bit, NaN included (a NaN's payload too).
            bits = _same_width_int(a.dtype)
            assert torch.equal(a.view(bits), b.view(bits)), key


def _same_width_int(dtype):
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


# Instruction prefixes that may precede an instruction's opcode bytes; EVEX (AVX-512's
# encoding, of zmm registers, mask registers and xmm/ymm 16-31) begins with 0x62 after them.
_LEGACY_PREFIXES = {"66", "67", "f2", "f3", "2e", "3e", "26", "64", "65", "36", "f0"}


def _functions_with_avx512_instructions(library):
    listing = subprocess.run(["objdump", "-d", "-w", "-C", "--no-addresses", library],
                             capture_output=True, text=True, check=True).stdout
    found, function = {}, None
    for line in listing.splitlines():
        if line.startswith("<") and line.endswith(">:"):
            function = line[1:-2]
            continue
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        code = fields[1].split()
        i = 0
        while i < len(code) and code[i] in _LEGACY_PREFIXES:
            i += 1
        if i < len(code) and code[i] == "62":
            found[function] = found.get(function, 0) + 1
    return found


@pytest.mark.skipif(not X86, reason="per-ISA builds exist on x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_only_the_avx512_build_uses_avx512_instructions():
    found = _functions_with_avx512_instructions(cnn_attention.library_path())
    # The AVX-512 build is in the library (the test would pass vacuously otherwise) ...
    assert any(name.startswith("cnn_attention::ops::cpu::AVX512::scale_by_scores") for name in found)
    # ... and every function with an AVX-512 instruction belongs to it or to ATen's AVX-512
    # vector types: nothing that an AVX2 CPU runs.
    # (OpenMP's outlined regions keep their mangled names: "6AVX512" is the namespace there.)
    outside = sorted(name for name in found if "AVX512::" not in name and "6AVX512" not in name)
    assert not outside, outside[:10]
