"""Command-line flags generated from a script's config dataclass: one field, one flag.

    micro_batch_size: int = 64  -> --micro-batch-size 64
    compile: bool = True        -> --compile / --no-compile
    log_dirs: tuple[str, ...]   -> --log-dir A B, or --log-dir A --log-dir B (flag name from metadata)
    max_tokens: int             -> --max-tokens 1e9 (ints also as 1e9 or 100_000_000)
    max_lr: float               -> --max-lr 6e-4, also negative: --max-lr -1e-3 (then refused by validation)

Each field's help comes from `field(default, help, ...)`; choices are listed in --help with the
default. Every script's config validates itself in `__post_init__`, so a bad flag fails while
parsing, before any process group, data or folder is touched; `parse_config` turns that into a
ValueError for the script's one-line error.

    uv run python -c "import cli, sample; print(cli.parse_config(sample.SampleConfig, ['--top-k', '5']))"
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Sequence


def field(default: Any, help: str, choices: Sequence | None = None, flag: str | None = None,
          metavar: str | None = None):
    """A dataclass field with a default, a help string and optional choices / flag name / metavar."""
    metadata = {"help": help, "choices": choices, "flag": flag, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults (configs are frozen)")
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def build_parser(config_cls, description: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of `config_cls`; unset flags parse as None, so a
    script can layer presets under the flags the user gave (`parse_flags`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, config_cls)
    return parser


def add_config_flags(parser, config_cls, only: Sequence[str] | None = None) -> None:
    """Add one flag per field of `config_cls` (or of the fields named in `only`) to `parser`, which
    may be an argument group: several configs can share a parser."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if only is not None and f.name not in only:
            continue
        kind = hints[f.name]
        # argparse %-formats help strings: a literal "5%" must reach it as "5%%"
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", "").replace("%", "%%"), "default": None, "dest": f.name}
        origin = typing.get_origin(kind)
        if kind is bool:
            kwargs["help"] += f" (default: {'on' if f.default else 'off'})"
            parser.add_argument(flag_name(f), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if origin is tuple:
            # `--input a b` and `--input a --input b` both collect (a, b); unset = the field default.
            item = typing.get_args(kind)[0]
            if f.default:
                kwargs["help"] += f" (default: {' '.join(map(str, f.default))})"
            parser.add_argument(flag_name(f), type=_int if item is int else item, action="extend", nargs="+",
                                metavar=f.metadata.get("metavar") or f.name.upper(), **kwargs)
            continue
        if origin is typing.Union or str(origin) == "types.UnionType":  # Optional[X] / X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if f.metadata.get("choices"):
            # argparse shows {a,b,c} as the metavar when none is given: the choices in --help
            kwargs["choices"] = list(f.metadata["choices"])
        else:
            kwargs["metavar"] = f.metadata.get("metavar") or f.name.upper()
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


def _is_number(text: str) -> bool:
    try:
        float(text.replace("_", ""))
    except ValueError:
        return False
    return True


def join_negative_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """argparse reads `--max-lr -1e-3` as two flags (only plain `-1` / `-.5` count as numbers for
    it); join a negative number to the single-value flag before it: `--max-lr=-1e-3`."""
    takes_value = {opt for action in parser._actions if action.nargs is None and action.option_strings
                   for opt in action.option_strings}
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-") and _is_number(argv[i + 1]):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def parse_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> dict:
    """The flags the user actually gave, as {field name: value} (argparse leaves the others None)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    namespace = parser.parse_args(join_negative_values(parser, argv))
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(namespace).items() if v is not None}


def parse_value(config_cls, name: str, text: str):
    """Convert `text` to the type of field `name` of `config_cls` (for NAME=VALUE style options)."""
    hints = typing.get_type_hints(config_cls)
    if name not in hints:
        raise ValueError(f"unknown setting {name!r}: use a field name such as {next(iter(hints))}")
    kind = hints[name]
    if kind is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"{name}={text}: expected true or false")
        return text.lower() in ("1", "true", "yes", "on")
    if kind is int:
        try:
            return _int(text)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{name}={text}: {e}") from None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name}={text}: expected a {kind.__name__}") from None


def parse_config(config_cls, argv: Sequence[str] | None = None, description: str | None = None):
    """Parse argv into a `config_cls`, unset flags keeping the dataclass defaults. A value the
    config's own validation refuses raises ValueError (one line, naming the flag)."""
    return config_cls(**parse_flags(build_parser(config_cls, description), argv))
