"""The ``mmsafe`` command line: parse arguments, call one library function, report.

Each stage command's flags come from its typed config (:mod:`mmsafe.cli.arguments`);
handlers import the library lazily so ``mmsafe --help`` stays fast. Errors a user can
cause (:class:`~mmsafe.errors.MmsafeError`) are printed as one line and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mmsafe import __version__
from mmsafe.cli.answering import add_blind, add_generate, add_probe
from mmsafe.cli.evaluation import add_benchmarks, add_judge, add_pairwise, add_report
from mmsafe.cli.utilities import add_data, add_env, add_models
from mmsafe.cli.workflows import add_build_data, add_demo, add_run, add_train
from mmsafe.errors import MmsafeError

# In the order of the flow: the whole loop first, then each stage.
COMMANDS = [
    add_demo,
    add_run,
    add_data,
    add_build_data,
    add_blind,
    add_train,
    add_generate,
    add_judge,
    add_report,
    add_pairwise,
    add_probe,
    add_benchmarks,
    add_models,
    add_env,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmsafe",
        description="Make vision-language assistants harmless with preference optimization (DPO, BPO), and measure how harmless they are.",
    )
    parser.add_argument("--version", action="version", version=f"mmsafe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (INFO and debug details)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse an argument holding a lone surrogate (how Python reads bytes that are not
    UTF-8): a model or judge name with one could be neither sent nor written."""
    from mmsafe.data.jsonl import find_lone_surrogate, surrogate_message
    from mmsafe.errors import ConfigError

    for name, value in vars(args).items():
        found = find_lone_surrogate(value) if isinstance(value, str | list) else None
        if found is not None:
            shown = name.removeprefix("config.").replace("_", "-")
            raise ConfigError(f"argument {shown}: {surrogate_message(found[1])} (is the argument UTF-8?)")


def _outputs(args: argparse.Namespace) -> list[str]:
    """What the command writes, as far as its arguments say."""
    if getattr(args, "output_path", None) is not None:
        return [str(args.output_path)]
    names = ("config.out", "config.output_dir", "out", "out_path")
    return [str(getattr(args, name)) for name in names if isinstance(getattr(args, name, None), str)]


def _os_error_place(error: OSError, args: argparse.Namespace) -> str:
    """The file an OSError names, else the command and the output it was writing."""
    if error.filename:
        return str(error.filename)
    command = " ".join(str(part) for part in (args.command, getattr(args, "data_command", None)) if part)
    outputs = _outputs(args)
    return f"mmsafe {command}" + (f" (output {', '.join(outputs)})" if outputs else " (the system named no file)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, ``kill``): unwound like Ctrl-C, so what is written is kept."""


def _raise_terminated(signum: int, frame: object) -> None:
    import signal

    # Once: a second SIGTERM (a scheduler signalling the whole process group, ``timeout``
    # forwarding its own) must not cut short the unwinding that keeps what is written.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


#: Commands that pick up where an interrupted run stopped when rerun as they were.
RESUMABLE = ("generate", "blind", "probe", "judge", "run", "demo", "build-data", "train")


def resume_command(argv: Sequence[str]) -> str:
    """The command line that reruns this one, shell-quoted."""
    import os
    import shlex

    program = sys.argv[0] if sys.argv else "mmsafe"
    prefix = [sys.executable, "-m", "mmsafe"] if os.path.basename(program) == "__main__.py" else ["mmsafe"]
    return shlex.join([*prefix, *argv])


def _count_rows(path: Path) -> int | None:
    try:
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip() and line.endswith(b"\n"))
    except OSError:
        return None


def interrupt_message(args: argparse.Namespace, argv: Sequence[str], signal_name: str) -> str:
    """What an interrupted command says: how far it got, what is saved where, how to go on."""
    from mmsafe.progress import last_progress

    state = last_progress()
    outputs = _outputs(args)
    out = Path(outputs[0]) if outputs else None
    saved = _count_rows(out) if out is not None and out.is_file() else None
    noun = "responses" if args.command in ("generate", "blind") else "verdicts" if args.command == "judge" else "rows"
    if saved is not None and state is not None and not state.finished and state.total is not None:
        # The last progress counted this run's work; the file also holds what earlier runs wrote.
        what = f"{saved} of {saved - state.done + state.total} {noun} saved in {out}"
    elif saved is not None:
        what = f"{saved} {noun} saved in {out}"
    elif state is not None and not state.finished:
        what = f"stopped in {state.desc or 'a step'} at {state.done}{f' of {state.total}' if state.total is not None else ''}"
        if out is not None:
            what += f"; what finished is saved in {out}"
    else:
        what = f"what finished is saved in {out}" if out is not None else "stopped"
    message = f"interrupted ({signal_name}): {what}"
    if args.command in RESUMABLE:
        message += f"; rerun the same command to resume:\n  {resume_command(argv)}"
    return message


#: Commands whose --model names a checkpoint (hf engine): checked before the parser is built.
_MODEL_COMMANDS = ("generate", "blind", "probe", "pairwise")


def _model_typo_check(argv: Sequence[str]) -> None:
    """Check ``--model`` before anything slow (the full parser imports numpy): a typo fails at once."""
    from mmsafe.models.loading import check_model_name

    def values(flag: str) -> list[str]:
        found = [argv[index + 1] for index, part in enumerate(argv[:-1]) if part == flag]
        return found + [part.partition("=")[2] for part in argv if part.startswith(flag + "=")]

    command = next((part for part in argv if not part.startswith("-")), None)
    if command not in _MODEL_COMMANDS or "openai" in values("--engine") or "--print-config" in argv:
        return
    for value in values("--model"):
        if value and not value.startswith("-"):
            check_model_name(value, what="--model")


def main(argv: Sequence[str] | None = None) -> int:
    import contextlib
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" not in argv and "--help" not in argv:
        try:
            _model_typo_check(argv)
        except MmsafeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    previous_handler = None
    with contextlib.suppress(ValueError):  # not the main thread: SIGTERM is left alone
        previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        from mmsafe.progress import progress_every

        progress_every()  # a bad MMSAFE_PROGRESS_EVERY fails now, not after the model loads
        _check_arguments(args)
        return args.handler(args)
    except MmsafeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the file system said no (permissions, a full disk, a bad output path): name the file
        print(f"error: {_os_error_place(error, args)}: {error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        print(interrupt_message(args, argv, "SIGTERM" if terminated else "Ctrl-C"), file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
