"""Command-line flags generated from a script's config dataclass: one field, one flag.

    micro_batch_size: int = 64  -> --micro-batch-size 64
    compile: bool = True        -> --compile / --no-compile
    log_dirs: tuple[str, ...]   -> --log-dir A B, or --log-dir A --log-dir B (flag name from metadata)
    max_tokens: int             -> --max-tokens 1e9 (ints also as 1e9 or 100_000_000)
    max_lr: float               -> --max-lr 6e-4; a negative value joined by `=`: --max-lr=-1e-3
                                   (argparse reads `--max-lr -1e-3` as a flag without its value)

Each field's help comes from `field(default, help, ...)`; choices are listed in --help with the
default. Every script's config validates itself in `__post_init__`, so a bad flag fails while
parsing, before any process group, data or folder is touched: it raises UserError, which
`run_main` prints as the script's one-line error (exit 2).

    uv run python -c "import cli, sample; print(cli.parse_config(sample.SampleConfig, ['--top-k', '5']))"
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import signal
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Defaults every script shares, defined once. The data dir lives here rather than in dataloader.py
# because fineweb.py, which writes it, never imports torch (dataloader.py does).
DEFAULT_DATA_DIR = "edu_fineweb10B"
DEFAULT_LOG_DIR = "log"
DEMO_DATA_DIR = "demo_fineweb"  # the demo's shards: `fineweb.py --demo` writes them, `train_gpt2.py --demo` reads them
DEFAULT_CHECKPOINT = f"{DEFAULT_LOG_DIR}/model_final.pt"  # what a finished training run leaves
DEFAULT_HELLASWAG_DATA = "hellaswag/hellaswag_val.jsonl"  # hellaswag.py downloads it there once
DEFAULT_CORE_DATA = "core_data"  # core.py downloads CORE's task files there once
# The choices of flags that several scripts share; the modules that act on them (runtime, parallel,
# model) take them from here, so that a script can check its flags without importing torch.
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")  # auto: cuda, else mps (Apple silicon), else cpu
DEVICE_HELP = "auto (cuda, else mps, else cpu), cpu, cuda or mps"  # --device's help, in every script
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # runtime.precision
STRATEGIES = ("ddp", "fsdp")  # parallel.parallelize: how the model is spread over ranks
ATTENTION_KERNELS = ("auto", "flash", "cudnn", "efficient", "math")  # the keys of model.ATTENTION_BACKENDS
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")  # torch.compile's
# The modes that capture CUDA graphs, each with the same mode without them.
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


class UserError(ValueError):
    """A problem the user can fix (a bad flag, a missing file, data made with other settings): its
    message is one line naming the problem and the fix. Every script's own errors derive from it."""

    exit_code = 2  # nothing was done: change what the message says, then rerun


class RunFailed(Exception):
    """A run that worked and then failed (diverged, a checkpoint or the log not written, a lost rank):
    one line, exit 1; its newest checkpoint is intact and the same command resumes from it once the
    cause is fixed. `every_rank`: printed by every rank that raises it (an error only some ranks see)."""

    exit_code = 1

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a script's `main(argv)` under the one CLI convention: a UserError or an OSError (a file that
    is missing, unreadable, a full disk) prints `<script>: error: <message>` once per job (rank 0 under
    torchrun) and exits 2; a RunFailed prints its line and exits 1; Ctrl-C exits 130 (a
    KeyboardInterrupt raised with a message, e.g. what to do next, adds it to the line). Anything else
    is a bug: its traceback is kept.

        if __name__ == "__main__":
            sys.exit(cli.run_main(main))
    """
    try:
        return main(argv)
    except (UserError, OSError) as e:
        print_error(str(e) if isinstance(e, UserError) else os_error_message(e))
        stop_restarts()
        return UserError.exit_code
    except RunFailed as e:
        print_error(str(e), every_rank=e.every_rank)
        return e.exit_code
    except KeyboardInterrupt as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"\n{script_name()}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr, flush=True)
        return 130


def stop_restarts() -> None:
    """Under torchrun with restarts left (train.sh's --max-restarts), stop it from restarting the job
    after a user error: every restart would meet the same error (a flag, the data, a GPU another
    process holds), and torchrun restarts on any failed worker whatever its exit code. Each worker
    sends SIGTERM to its own torchrun, which then stops every worker of its node and exits 1 (with
    its own traceback: `SignalException ... got signal: 15`). Rank 0 first, having printed the one
    line; the others a moment later, so that torchrun's SIGTERM to the workers cannot cut that line.
    Elsewhere (no torchrun, no restarts left): nothing."""
    restarts_left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - int(
        os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    )
    launcher = os.getppid()
    try:
        command = Path(f"/proc/{launcher}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return  # not Linux: no way to tell that the parent is torchrun
    if "TORCHELASTIC_RUN_ID" not in os.environ or restarts_left <= 0 or "torch" not in command:
        return
    sys.stderr.flush()
    if os.environ.get("RANK", "0") != "0":
        time.sleep(1.0)
    os.kill(launcher, signal.SIGTERM)


def script_name() -> str:
    return Path(sys.argv[0]).name or "python"


def print_error(message: str, every_rank: bool = False) -> None:
    """`<script>: error: <message>` on stderr, from rank 0 only (every rank of a job sees the same error),
    or from `every_rank` for an error only some ranks see."""
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(f"{script_name()}: error: {message}", file=sys.stderr, flush=True)


def parse_first(parse: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None) -> None:
    """Check the command line now, at the top of a script and before its heavy imports: `--help` and
    a bad flag are answered in the time Python takes to start, not after torch has loaded (seconds;
    27 s measured on a loaded node). `parse(argv)` is the script's own parsing (it raises UserError or
    exits through Parser.error); main() parses again later, which costs nothing. Call it as

        if __name__ == "__main__":
            cli.parse_first(parse_args)  # then the imports of torch and the rest
    """
    try:
        parse(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print_error(str(e))
        stop_restarts()
        sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: argparse's own prints the whole usage block first (43 lines
    for the trainer) and buries the one line that matters. An unknown flag names the closest ones."""

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}{self._suggestion(unknown)}")
        return namespace

    def _suggestion(self, unknown: list[str]) -> str:
        flags = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        for arg in unknown:
            name = arg.split("=", 1)[0]
            close = difflib.get_close_matches(name.replace("_", "-"), flags, n=2, cutoff=0.8)
            if name.startswith("-") and close:
                return f": did you mean {' or '.join(close)}?"
        return ""

    def error(self, message: str):
        print_error(f"{message} (--help lists the flags)")
        stop_restarts()
        sys.exit(2)


def os_error_message(e: OSError) -> str:
    """An OSError in one line: `<what failed>: <path>` without the errno tuple."""
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return str(e) or type(e).__name__


def field(
    default: Any,
    help: str,
    choices: Sequence | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    *,
    section: str | None = None,
    auto: bool = False,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
):
    """A dataclass field with a default, a help string and optional choices / flag name / metavar;
    `section`: its --help group; `auto`: an int flag that also takes the word auto, read as 0 (the
    script decides); above / at_least / below / at_most: the bounds `check_bounds` enforces, naming
    the flag."""
    metadata = {
        "auto": auto,
        "help": help,
        "choices": choices,
        "flag": flag,
        "metavar": metavar,
        "section": section,
        "bounds": (above, at_least, below, at_most),
    }
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults (configs are frozen)")
    return dataclasses.field(default=default, metadata=metadata)


def sections(**first_fields: str):
    """Class decorator for a config dataclass: its --help sections, each named at its first field and
    running to the next one (`@sections(model="model", tokens_per_step="batch")`), recorded in each
    field's metadata as `section` (a field's own `section=` wins)."""

    def mark(config_cls):
        current = None
        for f in dataclasses.fields(config_cls):
            current = first_fields.get(f.name, current)
            if current and not f.metadata.get("section"):
                f.metadata = types.MappingProxyType({**f.metadata, "section": current})
        return config_cls

    return mark


def check_bounds(config) -> None:
    """UserError naming the flag for the first setting of `config` outside its field's bounds."""
    for f in dataclasses.fields(config):
        above, at_least, below, at_most = f.metadata.get("bounds", (None,) * 4)
        value = getattr(config, f.name)
        rules = [
            (ok, text)
            for bound, ok, text in (
                (above, above is not None and value > above, "positive" if above == 0 else f"> {above}"),
                (at_least, at_least is not None and value >= at_least, f">= {at_least}"),
                (below, below is not None and value < below, f"< {below}"),
                (at_most, at_most is not None and value <= at_most, f"<= {at_most}"),
            )
            if bound is not None
        ]
        if not all(ok for ok, _ in rules):
            raise UserError(f"{flag_name(f)} must be {' and '.join(text for _, text in rules)}, got {value}")


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def build_parser(config_cls, description: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of `config_cls`; unset flags parse as None, so a
    script can layer presets under the flags the user gave (`parse_flags`)."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, config_cls)
    return parser


def add_config_flags(parser, config_cls, only: Sequence[str] | None = None) -> None:
    """Add one flag per field of `config_cls` (or of the fields named in `only`) to `parser`, which
    may be an argument group: several configs can share a parser."""
    hints = typing.get_type_hints(config_cls)
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if only is not None and f.name not in only:
            continue
        section = f.metadata.get("section")
        target = parser
        if section and isinstance(parser, argparse.ArgumentParser):  # --help lists the flags by section (a group
            # of a parser, as bench/throughput.py passes, cannot hold groups: argparse would not print them)
            target = sections.get(section) or sections.setdefault(section, parser.add_argument_group(section))
        _add_flag(target, f, hints[f.name])


def _add_flag(parser, f: dataclasses.Field, kind) -> None:
    """One flag for field `f` of type `kind`."""
    # argparse %-formats help strings: a literal "5%" must reach it as "5%%"
    kwargs: dict[str, Any] = {"help": f.metadata.get("help", "").replace("%", "%%"), "default": None, "dest": f.name}
    origin = typing.get_origin(kind)
    if kind is bool:
        kwargs["help"] += f" (default: {'on' if f.default else 'off'})"
        parser.add_argument(flag_name(f), action=argparse.BooleanOptionalAction, **kwargs)
        return
    if origin is tuple:
        # `--input a b` and `--input a --input b` both collect (a, b); unset = the field default.
        item = typing.get_args(kind)[0]
        if f.default:
            kwargs["help"] += f" (default: {' '.join(map(str, f.default))})"
        parser.add_argument(
            flag_name(f),
            type=_int if item is int else item,
            action="extend",
            nargs="+",
            metavar=f.metadata.get("metavar") or f.name.upper(),
            **kwargs,
        )
        return
    if origin is typing.Union or str(origin) == "types.UnionType":  # Optional[X] / X | None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if f.metadata.get("choices"):
        # argparse shows {a,b,c} as the metavar when none is given: the choices in --help
        kwargs["choices"] = list(f.metadata["choices"])
    else:
        kwargs["metavar"] = f.metadata.get("metavar") or f.name.upper()
    if f.metadata.get("auto"):  # --micro-batch-size auto: 0, which the script resolves
        kwargs["metavar"] = "N|auto"
        kwargs["help"] += f" (default: {f.default or 'auto'})"
        parser.add_argument(flag_name(f), type=lambda text: 0 if text == "auto" else _int(text), **kwargs)
        return
    kwargs["help"] += f" (default: {f.default})" if f.default not in (None, "") else ""
    parser.add_argument(flag_name(f), type=_int if kind is int else kind, **kwargs)


def _int(text: str) -> int:
    """Whole numbers, also written 524_288 or 1e9."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def parse_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> dict:
    """The flags the user actually gave, as {field name: value} (argparse leaves the others None)."""
    namespace = parser.parse_args(argv)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(namespace).items() if v is not None}


def parse_value(config_cls, name: str, text: str):
    """Convert `text` to the type of field `name` of `config_cls` (for NAME=VALUE style options)."""
    hints = typing.get_type_hints(config_cls)
    if name not in hints:
        raise UserError(f"unknown setting {name!r}: use a field name such as {next(iter(hints))}")
    kind = hints[name]
    if kind is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise UserError(f"{name}={text}: expected true or false")
        return text.lower() in ("1", "true", "yes", "on")
    if kind is int:
        try:
            return _int(text)
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{name}={text}: {e}") from None
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"{name}={text}: expected a {kind.__name__}") from None


def parse_config(config_cls, argv: Sequence[str] | None = None, description: str | None = None):
    """Parse argv into a `config_cls`, unset flags keeping the dataclass defaults. A value the
    config's own validation refuses raises UserError (one line, naming the flag)."""
    return config_cls(**parse_flags(build_parser(config_cls, description), argv))
