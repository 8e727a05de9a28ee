"""The ``vos-kernels`` command.

Subcommands:
  segment segment a video from its first-frame mask with the fused ops, scored with J&F
          (``vos-kernels segment --help``; default: the embedded ``chair`` clip)
  long-video  stream thousands of frames through the LFU memory bank and STCN's growing
          memory, plot time and memory per frame (``vos-kernels long-video --help``)
  info    versions, built backends, devices
  bench   the benchmark suite, fused kernels vs the naive reference
          (``vos-kernels bench --help``; results as JSON + markdown + plot)
"""
from __future__ import annotations

import argparse
import platform
import sys


def _info() -> int:
    import torch

    import vos_kernels
    from vos_kernels import _ops

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    rows = [
        ("vos_kernels", vos_kernels.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton_version),
        ("operator library", _ops.LIBRARY or f"not loaded ({_ops.LIBRARY_ERROR})"),
        ("backends", ", ".join(vos_kernels.available_backends())),
        ("CUDA C++ ops", ", ".join(vos_kernels.cuda_cpp_ops()) or "none built (CUDA tensors run Triton)"),
        ("backend chosen", vos_kernels.get_backend()),
        ("cpu threads", str(torch.get_num_threads())),
        ("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vos-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from vos_kernels import segment

    segment.build_parser(sub.add_parser("segment", help="segment a video from its first-frame mask (J&F, "
                                        "overlays, GIF); options: vos-kernels segment --help"))
    from vos_kernels import long_video

    long_video.build_parser(sub.add_parser("long-video", help="stream a long video through the LFU memory bank "
                                           "and STCN's growing memory; options: vos-kernels long-video --help"))
    sub.add_parser("info", help="versions, built backends, devices")
    sub.add_parser("bench", help="benchmark suite (options: vos-kernels bench --help)", add_help=False)
    if argv[:1] == ["segment"]:
        return segment.run_cli(parser.parse_args(argv))
    if argv[:1] == ["long-video"]:
        return long_video.run_cli(parser.parse_args(argv))
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _info()
    from vos_kernels import benchmark

    return benchmark.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
