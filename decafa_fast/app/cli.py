"""`decafa-fast` command line: bench, train, ablate, evaluate, predict, export, info.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; modules are
imported only when their subcommand runs, so `decafa-fast info` stays fast and a missing optional dependency
(onnx, say) only affects the command that needs it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "bench": ("decafa_fast.app.benchmark", "run the benchmark suite for this machine and print a summary"),
    "train": ("decafa_fast.app.training.train", "train DeCaFA (synthetic faces by default)"),
    "ablate": ("decafa_fast.app.training.ablate", "run the paper's Table 1 grid of fusions / transfer / lambdas"),
    "evaluate": ("decafa_fast.app.evaluation.evaluate", "evaluate a checkpoint: NME, AUC, failure rate, CED plot"),
    "predict": ("decafa_fast.app.prediction.predict", "landmarks for images, a folder, a video or a webcam"),
    "export": ("decafa_fast.app.export", "export a checkpoint to ONNX"),
}


def _info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from .. import __version__, ops

    print(f"decafa-fast {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
    print(f"backend: {ops.get_backend()}")
    for name, status in ops.backends().items():
        print(f"  {name:<10} {status}")
    from ..autotable import SHIPPED, user_table_path

    measured = ", ".join(ops.measured_gpus()) or "none"
    print(f"auto on CUDA: measured Triton-vs-CUDA races for GPU(s): {measured} (tables: {SHIPPED}, "
          f"{user_table_path()}); otherwise the first available of {ops.AUTO_CUDA_PREFERENCE}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decafa-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and which backends are available")
    info.set_defaults(handler=_info)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(module=module_name)
        # Only the chosen subcommand's module is imported (see main); its arguments are added then.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        sub = argparse.ArgumentParser(prog=f"decafa-fast {argv[0]}", description=COMMANDS[argv[0]][1])
        module.add_arguments(sub)
        return int(module.run(sub.parse_args(argv[1:])) or 0)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
