"""docs/flags.md, the reference of every script's flags, generated from the config dataclasses.

    python -m gpt_interventions.flagdoc        (or: make flags)   rewrites docs/flags.md

Each script's flags are found by asking the script itself for --help, so this lists exactly the
dataclasses, defaults, help and choices that its --help prints; tests/test_docs.py fails when
docs/flags.md is stale.
"""

import importlib
import os
import sys
from contextlib import contextmanager, redirect_stdout
from dataclasses import fields
from unittest import mock

from gpt_interventions import cli
from gpt_interventions.atomic import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join("docs", "flags.md")
SCRIPTS = ("train", "eval", "sample", "prepare_data", "compare", "sweep", "bench")
COMMAND = "python -m gpt_interventions.flagdoc"


class _Asked(Exception):
    """Raised in place of printing --help: carries what the script's parse_config was given."""


@contextmanager
def _asking():
    def record(classes, prog, usage):
        raise _Asked(classes, prog, usage)
    with mock.patch.object(cli, "format_help", record):
        yield


def script_flags(name):
    """(config classes, usage line) that `python NAME.py --help` lists."""
    module = importlib.import_module(name)
    with _asking(), redirect_stdout(sys.stderr):
        try:
            module.main(["--help"])
        except _Asked as asked:
            classes, _, usage = asked.args
            return classes, usage
    raise AssertionError(f"{name}.py --help did not reach parse_config")


def _cell(text):
    return str(text).replace("|", "\\|")


def flag_table(cls):
    """One dataclass's fields as a Markdown table: flag, default, help (with its choices)."""
    lines = ["| flag | default | what it does |", "|---|---|---|"]
    for f in fields(cls):
        doc = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            doc += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
        default = f"`{f.default}`" if f.default != "" else '`""`'
        lines.append(f"| `--{f.name}` | {_cell(default)} | {_cell(doc)} |")
    return "\n".join(lines)


def where(cls):
    """The file that defines cls, relative to the repository root."""
    return cls.__module__.replace(".", "/") + ".py"


def render():
    out = ["# Flags", "",
           f"Generated from the scripts' config dataclasses by `{COMMAND}` (or `make flags`): edit a field's",
           "help in the code, never this file; `tests/test_docs.py` fails when it is stale. Every flag is",
           "`--name=value` (a boolean alone means True) and a key of a TOML preset: the defaults < presets",
           "given as arguments (`config/*.toml`, later ones win) < flags. `python SCRIPT.py --help` prints",
           "the same list.", ""]
    out += ["| script | flags from |", "|---|---|"]
    listed, sections = {}, []
    for name in SCRIPTS:
        classes, usage = script_flags(name)
        out.append(f"| [`{name}.py`](#{name}py) | "
                   + ", ".join(f"`{c.__name__}`" for c in classes) + " |")
        parts = [f"## {name}.py", "", f"```\npython {name}.py {usage}\n```", ""]
        for cls in classes:
            if cls in listed:
                parts += [f"Every flag of `{cls.__name__}` ({listed[cls]}, above).", ""]
                continue
            listed[cls] = f"{name}.py"
            parts += [f"### {cls.__name__} ({where(cls)})", "", flag_table(cls), ""]
        sections += parts
    return "\n".join(out + [""] + sections).rstrip() + "\n"


def main():
    sys.path.insert(0, ROOT)  # the scripts live at the root
    text = render()
    atomic_write(os.path.join(ROOT, PATH), lambda f: f.write(text.encode()))
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
