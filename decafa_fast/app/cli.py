"""`decafa-fast` command line: bench, train, ablate, evaluate, predict, export, info.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int` (or
`run_argv(argv) -> int` when another program parses its options); modules are imported only when their
subcommand runs, so `decafa-fast info` stays fast and a missing optional dependency
(onnx, say) only affects the command that needs it.

A mistake in the user's input (a missing or malformed file, a bad flag, a full disk) is printed as one line,
`decafa-fast CMD: error: ...`, and the command exits with status 2; `--debug` (or DECAFA_DEBUG=1) shows the
traceback instead. Anything else that escapes is a bug and keeps its traceback. Ctrl-C ends a command with
one line, `decafa-fast CMD: interrupted: ...` saying what it had written and kept, and exit status 130. The
application's own warnings are one line each, `decafa-fast CMD: warning: ...`.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings
from pathlib import Path

from .errors import Interrupted, UserError

# subcommand -> (module, one-line help)
COMMANDS = {
    "bench": ("decafa_fast.app.benchmark", "run the benchmark suite for this machine and print a summary"),
    "train": ("decafa_fast.app.training.train", "train DeCaFA (synthetic faces by default)"),
    "ablate": ("decafa_fast.app.training.ablate", "run the paper's Table 1 grid of fusions / transfer / lambdas"),
    "evaluate": ("decafa_fast.app.evaluation.evaluate", "evaluate a checkpoint: NME, AUC, failure rate, CED plot"),
    "predict": ("decafa_fast.app.prediction.predict", "landmarks for images, a folder, a video or a webcam"),
    "export": ("decafa_fast.app.export", "export a checkpoint to ONNX"),
}
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's status for a command ended by SIGINT (128 + 2)
APP_DIR = str(Path(__file__).resolve().parent)
DEBUG_FLAG = "--debug"
DEBUG_HELP = "show the full traceback of an error (also DECAFA_DEBUG=1)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError (one line, exit status 2) instead of usage + exit."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def _info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from .. import __version__, ops
    from ..autotable import SHIPPED, user_table_path

    print(f"decafa-fast {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
    print(f"backend: {ops.get_backend()}")
    for name, status in ops.backends().items():
        print(f"  {name:<10} {status}")
    measured = ", ".join(ops.measured_gpus()) or "none"
    print(f"auto on CUDA: measured Triton-vs-CUDA races for GPU(s): {measured} (tables: {SHIPPED}, "
          f"{user_table_path()}); otherwise the first available of {ops.AUTO_CUDA_PREFERENCE}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="decafa-fast", description=__doc__.splitlines()[0])
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    info = sub.add_parser("info", help="versions and which backends are available")
    info.set_defaults(handler=_info)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(module=module_name)
        # Only the chosen subcommand's module is imported (see run_command); its arguments are added then.
    return parser


def run_command(argv: list[str]) -> int:
    """Run one command; errors propagate as exceptions (`main` turns the user's ones into one line)."""
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        if hasattr(module, "run_argv"):  # a command that hands its options to a program of its own (bench)
            return int(module.run_argv(argv[1:]))
        sub = ArgumentParser(prog=f"decafa-fast {argv[0]}", description=COMMANDS[argv[0]][1])
        module.add_arguments(sub)
        sub.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
        return int(module.run(sub.parse_args(argv[1:])) or 0)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


def user_message(error: BaseException) -> str | None:
    """The one line to print for an error caused by the user's input or machine; None for a bug."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError):  # FileNotFoundError, PermissionError, a full disk, ...
        if error.errno == errno.ENOSPC:
            where = f" while writing {error.filename}" if error.filename else ""
            return f"no space left on the disk{where}; free some space or choose another --out"
        if error.filename is not None and error.strerror:
            return f"{error.filename}: {error.strerror}"
        return str(error) or type(error).__name__
    if isinstance(error, ValueError):  # the readers' and validators' messages name the file / flag
        return _original_message(str(error)) or type(error).__name__
    return None


def _original_message(message: str) -> str:
    """A DataLoader worker's error arrives with the worker's traceback in its message: keep its last line,
    the original message, without the exception's type name."""
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


def main(argv: list[str] | None = None) -> int:
    """The `decafa-fast` entry point: exit status 0 on success, 1 when some inputs failed (each reported),
    2 on a user error (one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("DECAFA_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    prefix = f"decafa-fast {command}" if command else "decafa-fast"
    try:
        with warnings.catch_warnings():
            if not debug:
                _one_line_warnings(prefix)
            return run_command(argv)
    except SystemExit:  # --help
        raise
    except KeyboardInterrupt as error:
        if debug:
            raise
        kept = str(error) if isinstance(error, Interrupted) else ""
        print(f"{prefix}: interrupted{': ' + kept if kept else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        message = None if debug else user_message(error)
        if message is None:
            raise
        line = " ".join(message.split())  # one line, whatever the message's formatting
        print(f"{prefix}: error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR


def _one_line_warnings(prefix: str) -> None:
    """Show the application's own warnings as one line each, `PREFIX: warning: ...` (a library's warnings keep
    their usual form, with the file and line that raised them)."""
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(APP_DIR):
            print(f"{prefix}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.simplefilter("default")
    warnings.showwarning = one_line


if __name__ == "__main__":
    sys.exit(main())
