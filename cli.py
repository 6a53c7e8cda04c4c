"""Command-line flags generated from a script's config dataclass: one field, one flag.

    micro_batch_size: int = 64  -> --micro-batch-size 64
    compile: bool = True        -> --compile / --no-compile
    log_dirs: tuple[str, ...]   -> --log-dir A B, or --log-dir A --log-dir B (flag name from metadata)
    max_tokens: int             -> --max-tokens 1e9 (ints also as 1e9 or 100_000_000)

Each field's help comes from `field(metadata={"help": ...})`; choices from metadata "choices".
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


def build_parser(config_cls, description: str | None = None, defaults: dict | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of `config_cls`. `defaults` overrides field defaults
    for the help text only (e.g. a preset); unset flags parse as None so presets can fill them."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, config_cls, defaults)
    return parser


def add_config_flags(parser: argparse.ArgumentParser, config_cls, defaults: dict | None = None) -> None:
    """Add one flag per field of `config_cls` to `parser` (several configs may share a parser)."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        default = (defaults or {}).get(f.name, f.default)
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": None, "dest": f.name}
        origin = typing.get_origin(kind)
        if kind is bool:
            parser.add_argument(flag_name(f), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if origin is tuple:
            # `--input a b` and `--input a --input b` both collect (a, b); unset = the field default.
            item = typing.get_args(kind)[0]
            metavar = f.metadata.get("metavar") or f.name.upper()
            if f.default:
                kwargs["help"] += f" (default: {' '.join(map(str, f.default))})"
            parser.add_argument(flag_name(f), type=_int if item is int else item, action="extend", nargs="+",
                                metavar=metavar, **kwargs)
            continue
        if origin is typing.Union or str(origin) == "types.UnionType":  # Optional[X] / X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
        kwargs["help"] += f" (default: {default})" if default not in (None, "") else ""
        parser.add_argument(flag_name(f), type=_int if kind is int else kind, metavar=f.name.upper(), **kwargs)


def _int(text: str) -> int:
    """Whole numbers, also written 524_288 or 1e9."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


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
    return kind(text)


def given_flags(namespace: argparse.Namespace) -> dict:
    """The flags the user actually passed (argparse leaves the others at None)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(namespace).items() if v is not None}


def parse_config(config_cls, argv: Sequence[str] | None = None, description: str | None = None):
    """Parse argv into a `config_cls`, unset flags keeping the dataclass defaults."""
    parser = build_parser(config_cls, description)
    return config_cls(**given_flags(parser.parse_args(argv)))
