"""Config dataclasses as a command line: every field a typed --flag and a TOML preset key.

A script declares its config as dataclasses whose fields are made with `field` (default, one line
of help, optional choices), then calls `parse_config`: defaults < presets (*.toml) < --flags.
`--help` and docs/flags.md (gpt_interventions/flagdoc.py) are generated from the same fields, so
they never drift.
"""

import dataclasses
import difflib
import os
import sys
import tomllib
import typing
from dataclasses import fields

from gpt_interventions.errors import UsageError


def field(default, help, choices=None):
    """A dataclass field with one line of help (shown by --help) and optional allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _convert(name, text, typ):
    """Parse a command-line string into the field's declared type."""
    if typ is bool:
        low = str(text).lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"--{name} expects True or False, got {text!r}")
    try:
        if typ is int:
            f = float(text)  # accept 1e6 and 1_000_000 alike, but only whole numbers
            if not f.is_integer():
                raise ValueError
            return int(f)
        if typ is float:
            return float(text)
    except (ValueError, OverflowError):
        raise UsageError(f"--{name} expects {typ.__name__}, got {text!r}") from None
    return str(text)


def _check_value(name, value, typ, choices):
    """Type-check a value coming from TOML (already typed) and the allowed choices."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UsageError(f"{name} expects {typ.__name__}, got {value!r}")
    if choices is not None and value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def config_fields(classes):
    """Map flag name -> (class, dataclasses.Field, type) over several dataclasses (names unique)."""
    out = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            assert f.name not in out, f"flag --{f.name} defined twice"
            out[f.name] = (cls, f, hints[f.name])
    return out


def format_help(classes, prog, usage):
    lines = [f"usage: {prog} {usage}", ""]
    for cls in classes:
        lines.append(f"{cls.__name__}:")
        for f in fields(cls):
            doc = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if choices:
                doc += f" ({' | '.join(map(str, choices))})"
            lines.append(f"  --{f.name}={f.default!s}".ljust(36) + f" {doc}")
        lines.append("")
    return "\n".join(lines)


def split_flags(argv):
    """Split argv into positionals and an ordered list of (name, value-or-None) flags."""
    positionals, flags = [], []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            flags.append((name, value if eq else None))
        else:
            positionals.append(arg)
    return positionals, flags


def load_preset(path):
    if not os.path.isfile(path):
        raise UsageError(f"preset {path} not found; presets live in config/ (e.g. config/tiny.toml)")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"preset {path} is not valid TOML: {e}") from None


def is_preset(positional, load_dir=None):
    """A *.toml preset, or a directory where a script reads directories as presets (load_dir)."""
    return positional.endswith(".toml") or (load_dir is not None and os.path.isdir(positional))


def parse_config(argv, classes, prog, usage, bases=None, max_positionals=0, load_dir=None):
    """Resolve config: defaults (or `bases`) < TOML presets (*.toml positionals) < --flags.

    Returns (list of config instances, other positionals, set of names set explicitly).
    Every dataclass field is a flag; flags are typed from the dataclass annotations.
    `load_dir`, if given, reads a positional that is a directory into a preset's dict (train.py: a
    run directory of the story, gpt_interventions/story_runs.py); it stacks in order with the TOMLs.
    """
    table = config_fields(classes)
    positionals, flags = split_flags(argv)
    if any(name in ("help", "h") for name, _ in flags) or "-h" in positionals:
        print(format_help(classes, prog, usage))
        sys.exit(0)
    values = {}
    for base in bases or []:
        values.update(dataclasses.asdict(base))
    presets = [p for p in positionals if is_preset(p, load_dir)]
    others = [p for p in positionals if not is_preset(p, load_dir)]
    if len(others) > max_positionals:
        raise UsageError(f"unexpected argument {others[max_positionals]!r}; usage: {prog} {usage}")
    explicit = set()
    for path in presets:
        for name, value in (load_preset(path) if path.endswith(".toml") else load_dir(path)).items():
            if name not in table:
                raise UsageError(f"preset {path}: unknown key {name!r}{_suggest(name, table)}")
            _, f, typ = table[name]
            values[name] = _check_value(f"preset {path}: {name}", value, typ, f.metadata.get("choices"))
            explicit.add(name)
    for name, text in flags:
        if name not in table:
            raise UsageError(f"unknown flag --{name}{_suggest(name, table)}; see --help")
        _, f, typ = table[name]
        if text is None:
            if typ is not bool:
                raise UsageError(f"--{name} needs a value: --{name}=VALUE")
            text = "True"
        value = _convert(name, text, typ)
        values[name] = _check_value(f"--{name}", value, typ, f.metadata.get("choices"))
        explicit.add(name)
    configs = []
    for cls in classes:
        kwargs = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        configs.append(cls(**kwargs))
    return configs, others, explicit


def _suggest(name, table):
    close = difflib.get_close_matches(name, list(table), n=1)
    return f" (did you mean --{close[0]}?)" if close else ""
