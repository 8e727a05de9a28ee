"""Small cases of every CUDA C++ kernel, for compute-sanitizer (scripts/gpu_check.sh).

Runs each op of ``vos_kernels.cuda_cpp_ops()`` on backend "cuda" once or twice on small,
odd shapes that reach every code path the kernels have (tile tails, several labels, an
empty label, atrous rates, several reference frames, float32 under both matmul
precisions, float64 and half inputs, the backward, usage modes, the single- and
multi-chunk EM paths), then synchronises. It checks no values: memcheck and racecheck
report what they see, and the tests check the values.

The cases come in groups (global, local, pooling, topk, gmm_em, prototype_attention,
prototype_values), each with its own seeded generator, so ``--groups`` reruns a few with
the same inputs. The groups run in a child process (``--one-process``); a group that
raises is reported and the next one runs; a group after which the CUDA context is lost (a
kernel fault makes every later CUDA call in that process fail) ends the child with exit
status 75, and a fresh child runs the groups left, so that one faulting kernel does not
hide the others from the sanitizer (which follows child processes). Exit status: 0 every
group ran, 1 a group raised or lost the context, 2 no CUDA device or a usage error.
``--device cpu`` runs the same cases on backend "cpu" (a self-test of this script).

    compute-sanitizer --tool memcheck --target-processes all python scripts/sanitize_cases.py
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import traceback
import zlib
from typing import Callable

import torch

import vos_kernels as vk
from vos_kernels._device_guard import CONTEXT_LOST_EXIT, cuda_context_lost


class Inputs:
    """Random inputs on the run's device from a generator seeded by the group's name."""

    def __init__(self, group: str, dev: torch.device):
        self.dev = dev
        self.g = torch.Generator().manual_seed(zlib.crc32(group.encode()))

    def randn(self, *shape, dtype=torch.float32):
        return torch.randn(*shape, generator=self.g).to(dtype).to(self.dev)

    def labels(self, L, *shape):
        return torch.randint(-1, L, shape, generator=self.g).to(self.dev)

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.g).to(self.dev)


def _global(x: Inputs) -> None:
    dev = x.dev
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            for (H, W, T, Hr, Wr, C, L, rate) in [(7, 9, 1, 6, 11, 3, 1, 1), (19, 23, 2, 17, 21, 32, 4, 2),
                                                   (9, 70, 1, 33, 29, 100, 3, 1)]:
                q, r = x.randn(2, H, W, C), x.randn(2, T, Hr, Wr, C)
                lab = x.labels(L, 2, T, Hr, Wr)
                lab[1][lab[1] == L - 1] = 0                      # an empty label
                vk.labelled_nearest_sqdist(q, r, lab, L, rate)
                bias = torch.linspace(-0.5, 0.5, L, device=dev)
                qg, rg = q.clone().requires_grad_(), r.clone().requires_grad_()
                fg, bg = vk.fb_global_matching(qg, rg, lab, L, bias, rate)
                (fg.sum() + bg.sum()).backward()
    finally:
        torch.set_float32_matmul_precision("highest")
    halves = (torch.float16, torch.bfloat16) if dev.type == "cuda" else ()    # CUDA-only inputs
    for dtype in (torch.float64, *halves):
        vk.labelled_nearest_sqdist(x.randn(1, 11, 13, 16, dtype=dtype), x.randn(1, 1, 12, 10, 16, dtype=dtype),
                                   x.labels(3, 1, 1, 12, 10), 3, 2)


def _local(x: Inputs) -> None:
    for (H, W, C, L, windows, rate) in [(9, 11, 3, 1, [1], 1), (24, 37, 32, 4, [4, 8, 12], 2),
                                        (15, 19, 64, 3, [2, 4, 6, 8, 10, 12], 1), (7, 8, 100, 12, [2, 20], 1)]:
        q, p = x.randn(2, H, W, C).requires_grad_(), x.randn(2, H, W, C).requires_grad_()
        bias = torch.linspace(-0.5, 0.5, L, device=x.dev)
        fg, bg = vk.fb_multi_local_matching(q, p, x.labels(L, 2, H, W), L, windows, bias, rate)
        (fg.sum() + bg.sum()).backward()
    vk.fb_multi_local_matching(x.randn(1, 10, 12, 16, dtype=torch.float64), x.randn(1, 10, 12, 16, dtype=torch.float64),
                               x.labels(3, 1, 10, 12), 3, [1, 3], [0.0, 0.1, 0.1], 1)


def _pooling(x: Inputs) -> None:
    vk.fb_instance_pooling(x.randn(2, 13, 17, 40), x.labels(4, 2, 13, 17), 4)


def _topk(x: Inputs) -> None:
    for (B, Nq, Nm, CK, CV, k) in [(1, 37, 50, 16, 24, 5), (2, 100, 1300, 64, 96, 20), (1, 64, 9, 32, 8, 20)]:
        for mode in ("hits", "weights"):
            usage = torch.zeros(B, Nm, device=x.dev)
            qk = x.randn(B, Nq, CK).requires_grad_()
            out = vk.topk_memory_read(qk, x.randn(B, Nm, CK), x.randn(B, Nm, CV), k, usage=usage, usage_mode=mode)
            out.sum().backward()


def _gmm_em(x: Inputs) -> None:
    for (B, N, C, K, iters) in [(3, 196, 64, 10, 2), (1, 5000, 256, 30, 2), (2, 300, 33, 70, 1)]:
        mask = (x.rand(B, N) > 0.3).float()
        for kernel in ("dot", "l2"):
            vk.gmm_em(x.randn(B, N, C), torch.nn.functional.normalize(x.randn(B, K, C), dim=-1), iters, 20.0,
                      mask, kernel)
    vk.gmm_em(x.randn(2, 100, 16, dtype=torch.float64), x.randn(2, 5, 16, dtype=torch.float64), 2, 5.0)


def _prototype_attention(x: Inputs) -> None:
    for K in (20, 70):                                               # fast path, and K > 64
        vk.prototype_attention(x.randn(2, 300, 32), x.randn(2, K, 32), x.randn(2, K, 48), 1.0, "l2")
    vk.prototype_attention(x.randn(100, 196, 256), x.randn(100, 20, 256), x.randn(100, 20, 256), 1.0, "dot")


def _prototype_values(x: Inputs) -> None:
    for (B, N, CV, K) in [(3, 196, 256, 20), (1, 20000, 64, 30)]:     # one split, several splits
        vk.prototype_values(x.randn(B, N, CV), torch.softmax(x.randn(B, N, K), -1))


# group -> (the ops it runs: it runs if any has a CUDA C++ kernel, the cases)
GROUPS: dict[str, tuple[set[str], Callable[[Inputs], None]]] = {
    "global": ({"labelled_nearest_sqdist", "fb_global_matching"}, _global),
    "local": ({"fb_multi_local_matching"}, _local),
    "pooling": ({"fb_instance_pooling"}, _pooling),
    "topk": ({"topk_memory_read"}, _topk),
    "gmm_em": ({"gmm_em"}, _gmm_em),
    "prototype_attention": ({"prototype_attention"}, _prototype_attention),
    "prototype_values": ({"prototype_values"}, _prototype_values),
}


def groups_left(groups: list[str], output: str) -> list[str]:
    """The groups of a child's run that it did not report on (``sanitize_cases: NAME: ...``)."""
    done = {ln.split(":")[1].strip() for ln in output.splitlines() if ln.startswith("sanitize_cases: ")}
    return [g for g in groups if g not in done]


def drive(groups: list[str], device: str) -> int:
    """Run the groups in child processes, a fresh one after each lost context."""
    failed = False
    while groups:
        cmd = [sys.executable, os.path.abspath(__file__), "--one-process", "--device", device,
               "--groups", ",".join(groups)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        sys.stdout.write(proc.stdout)
        sys.stdout.flush()
        if proc.returncode == CONTEXT_LOST_EXIT:
            failed = True
            left = groups_left(groups, proc.stdout)
            if len(left) >= len(groups):
                print("sanitize_cases: no progress after a lost context; stopped", file=sys.stderr)
                return 1
            groups = left
            if groups:
                print(f"sanitize_cases: a fresh process for {', '.join(groups)}", flush=True)
            continue
        if proc.returncode == 2:
            return 2
        failed = failed or proc.returncode != 0
        break
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/sanitize_cases.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of: {', '.join(GROUPS)} (default all)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the same cases on backend 'cpu' (a self-test of this script)")
    p.add_argument("--one-process", action="store_true",
                   help="run the groups in this process (exit 75 after a lost CUDA context) instead of in children")
    args = p.parse_args(argv)
    groups = [s.strip() for s in args.groups.split(",") if s.strip()]
    unknown = [s for s in groups if s not in GROUPS]
    if unknown:
        p.error(f"--groups: unknown {unknown}; the groups are {list(GROUPS)}")
    if not args.one_process:
        return drive(groups, args.device)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("sanitize_cases.py: no CUDA device", file=sys.stderr)
            return 2
        ops = set(vk.cuda_cpp_ops())
        print("CUDA C++ ops:", sorted(ops), flush=True)
    else:
        ops = set().union(*(needs for needs, _ in GROUPS.values()))
    vk.set_backend(args.device)

    ran, failed = [], []
    for i, name in enumerate(groups):
        needs, cases = GROUPS[name]
        if not needs & ops:
            print(f"sanitize_cases: {name}: no CUDA C++ kernel built, skipped", flush=True)
            continue
        try:
            cases(Inputs(name, dev))
            if dev.type == "cuda":
                torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - reported; the next group runs
            traceback.print_exc()
            failed.append(name)
            print(f"sanitize_cases: {name}: FAILED (above)", flush=True)
            lost = cuda_context_lost()
            if lost:
                rest = groups[i + 1:]
                print(f"sanitize_cases: the CUDA context is lost after group {name} ({lost}); not run here: "
                      f"{', '.join(rest) or 'none'}", file=sys.stderr, flush=True)
                return CONTEXT_LOST_EXIT
            continue
        ran.append(name)
        print(f"sanitize_cases: {name}: ran", flush=True)
    print("ran:", ", ".join(ran) or "nothing (no CUDA C++ kernel built)", "| failed:", ", ".join(failed) or "none")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
