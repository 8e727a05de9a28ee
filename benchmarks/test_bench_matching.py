"""pytest-benchmark cases: fused vs reference CFBI matching at small and medium sizes.

The cases, inputs and implementations are those of the harness
(:mod:`vos_kernels.benchmark`): the fused op (backend "cpu" on CPU, "auto" on CUDA) and
the naive reference, on the same random inputs; one benchmark group per case, so
``pytest-benchmark compare`` / the table puts fused and reference side by side.

    python -m pytest benchmarks/ --benchmark-disable -q     # smoke: each case once
    python -m pytest benchmarks/                            # timed (pytest-benchmark)
    python -m pytest benchmarks/ --bench-device cuda        # GPU (synchronised calls)

The full suite with paper sizes, memory and error figures is
``python -m vos_kernels.benchmark``.
"""
import pytest
import torch

from vos_kernels import benchmark as vb

CASES = {c.name: c for c in vb.FULL_CASES}
# small (stride 16) and medium (stride 8) paper cases of both ops
BENCH_CASES = ["global/cfbip-s16", "global/cfbip-s8", "local/cfbip-s16", "local/cfbip-s8"]


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("case", BENCH_CASES)
def test_matching(benchmark, bench_device, case, impl):
    c = CASES[case]
    inputs = vb.make_inputs(c, seed=0, device=bench_device)
    fn = vb.implementation(c, impl, bench_device)

    def run():
        out = fn(**inputs)
        if bench_device.type == "cuda":
            torch.cuda.synchronize(bench_device)
        return out

    benchmark.group = case
    benchmark.extra_info.update(sizes=c.sizes(), impl=impl, flops=vb.OPS[c.op].flops(c, inputs))
    fg, bg = benchmark(run)
    K = (len(c.windows),) if c.op == "local" else ()
    assert fg.shape == bg.shape == (c.batch, c.num_labels, *K, c.height, c.width)
    assert bool(((fg >= -1) & (fg <= 1)).all()) and bool(((bg >= -1) & (bg <= 1)).all())
