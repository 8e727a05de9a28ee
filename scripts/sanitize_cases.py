"""Small cases of every CUDA C++ kernel, for compute-sanitizer (scripts/gpu_check.sh).

Runs each op of ``vos_kernels.cuda_cpp_ops()`` on backend "cuda" once or twice on small,
odd shapes that reach every code path the kernels have (tile tails, several labels, an
empty label, atrous rates, several reference frames, float32 under both matmul
precisions, float64 and half inputs, the backward, usage modes, the single- and
multi-chunk EM paths), then synchronises. It checks nothing itself: memcheck and
racecheck report what they see, and the tests check the values.

    compute-sanitizer --tool memcheck python scripts/sanitize_cases.py
"""
from __future__ import annotations

import sys

import torch

import vos_kernels as vk


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_cases.py: no CUDA device", file=sys.stderr)
        return 2
    ops = set(vk.cuda_cpp_ops())
    print("CUDA C++ ops:", sorted(ops))
    vk.set_backend("cuda")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(dev)

    def labels(L, *shape):
        return torch.randint(-1, L, shape, generator=g).to(dev)

    ran = []
    if {"labelled_nearest_sqdist", "fb_global_matching"} & ops:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            for (H, W, T, Hr, Wr, C, L, rate) in [(7, 9, 1, 6, 11, 3, 1, 1), (19, 23, 2, 17, 21, 32, 4, 2),
                                                   (9, 70, 1, 33, 29, 100, 3, 1)]:
                q, r = randn(2, H, W, C), randn(2, T, Hr, Wr, C)
                lab = labels(L, 2, T, Hr, Wr)
                lab[1][lab[1] == L - 1] = 0                      # an empty label
                vk.labelled_nearest_sqdist(q, r, lab, L, rate)
                bias = torch.linspace(-0.5, 0.5, L, device=dev)
                qg, rg = q.clone().requires_grad_(), r.clone().requires_grad_()
                fg, bg = vk.fb_global_matching(qg, rg, lab, L, bias, rate)
                (fg.sum() + bg.sum()).backward()
        torch.set_float32_matmul_precision("highest")
        for dtype in (torch.float64, torch.float16, torch.bfloat16):
            vk.labelled_nearest_sqdist(randn(1, 11, 13, 16, dtype=dtype), randn(1, 1, 12, 10, 16, dtype=dtype),
                                       labels(3, 1, 1, 12, 10), 3, 2)
        ran.append("global")
    if "fb_multi_local_matching" in ops:
        for (H, W, C, L, windows, rate) in [(9, 11, 3, 1, [1], 1), (24, 37, 32, 4, [4, 8, 12], 2),
                                            (15, 19, 64, 3, [2, 4, 6, 8, 10, 12], 1), (7, 8, 100, 12, [2, 20], 1)]:
            q, p = randn(2, H, W, C).requires_grad_(), randn(2, H, W, C).requires_grad_()
            bias = torch.linspace(-0.5, 0.5, L, device=dev)
            fg, bg = vk.fb_multi_local_matching(q, p, labels(L, 2, H, W), L, windows, bias, rate)
            (fg.sum() + bg.sum()).backward()
        vk.fb_multi_local_matching(randn(1, 10, 12, 16, dtype=torch.float64), randn(1, 10, 12, 16, dtype=torch.float64),
                                   labels(3, 1, 10, 12), 3, [1, 3], [0.0, 0.1, 0.1], 1)
        ran.append("local")
    if "fb_instance_pooling" in ops:
        vk.fb_instance_pooling(randn(2, 13, 17, 40), labels(4, 2, 13, 17), 4)
        ran.append("pooling")
    if "topk_memory_read" in ops:
        for (B, Nq, Nm, CK, CV, k) in [(1, 37, 50, 16, 24, 5), (2, 100, 1300, 64, 96, 20), (1, 64, 9, 32, 8, 20)]:
            for mode in ("hits", "weights"):
                usage = torch.zeros(B, Nm, device=dev)
                qk = randn(B, Nq, CK).requires_grad_()
                out = vk.topk_memory_read(qk, randn(B, Nm, CK), randn(B, Nm, CV), k, usage=usage, usage_mode=mode)
                out.sum().backward()
        ran.append("topk")
    if "gmm_em" in ops:
        for (B, N, C, K, iters) in [(3, 196, 64, 10, 2), (1, 5000, 256, 30, 2), (2, 300, 33, 70, 1)]:
            mask = (torch.rand(B, N, generator=g) > 0.3).float().to(dev)
            for kernel in ("dot", "l2"):
                vk.gmm_em(randn(B, N, C), torch.nn.functional.normalize(randn(B, K, C), dim=-1), iters, 20.0,
                          mask, kernel)
        vk.gmm_em(randn(2, 100, 16, dtype=torch.float64), randn(2, 5, 16, dtype=torch.float64), 2, 5.0)
        ran.append("gmm_em")
    if "prototype_attention" in ops:
        for K in (20, 70):                                           # fast path, and K > 64
            vk.prototype_attention(randn(2, 300, 32), randn(2, K, 32), randn(2, K, 48), 1.0, "l2")
        vk.prototype_attention(randn(100, 196, 256), randn(100, 20, 256), randn(100, 20, 256), 1.0, "dot")
        ran.append("prototype_attention")
    if "prototype_values" in ops:
        for (B, N, CV, K) in [(3, 196, 256, 20), (1, 20000, 64, 30)]:     # one split, several splits
            vk.prototype_values(randn(B, N, CV), torch.softmax(randn(B, N, K), -1))
        ran.append("prototype_values")
    torch.cuda.synchronize()
    print("ran:", ", ".join(ran) or "nothing (no CUDA C++ kernel built)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
