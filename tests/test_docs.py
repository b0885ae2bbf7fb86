"""The documents against the code: docs/flags.md is what the scripts' dataclasses generate, and every
command line README.md shows runs (offline, on the CPU) or is checked with --help / --dry_run."""

import importlib
import json
import os
import re
import shlex
import subprocess
from unittest import mock

import pytest

import train
from gpt_interventions import cli, flagdoc, resolve
from gpt_interventions.errors import UsageError
from helpers import ROOT


def test_flag_reference_is_generated_from_the_code():
    with open(os.path.join(ROOT, flagdoc.PATH)) as f:
        assert f.read() == flagdoc.render(), f"{flagdoc.PATH} is stale: run `{flagdoc.COMMAND}` (make flags)"


def test_flag_reference_lists_every_field_of_every_script():
    text = flagdoc.render()
    for name in flagdoc.SCRIPTS:
        classes, usage = flagdoc.script_flags(name)
        assert f"## {name}.py\n\n```\npython {name}.py {usage}\n```" in text
        for cls in classes:
            for field in cls.__dataclass_fields__:
                assert f"| `--{field}` |" in text


# ---------------------------------------------------------------------------------------------
# the commands the documents show

# README.md's commands run (train.py dry) or parse; the other documents' commands parse
DOCS = (["README.md", "interventions.md", "BENCHMARKS.md"]
        + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))))
LAUNCHERS = ("python", "torchrun", "make")
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


class Parsed(Exception):
    """Raised in place of running a script, once its command line has parsed."""


def command_lines(path):
    """(environment, words) of each python, torchrun or make line in a Markdown file's code blocks,
    continuation lines joined and comments cut."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        variables = {}  # the block's shell variables: NAME="..." lines, and a for loop's first value
        for line in block.replace("\\\n", " ").splitlines():
            assigned = re.match(r"\s*([A-Z_][A-Z0-9_]*)=(.*)$", line)
            looped = re.match(r"\s*for (\w+) in (\S+)", line)
            if assigned and not any(w in LAUNCHERS for w in line.split()):
                variables[assigned[1]] = " ".join(shlex.split(assigned[2]))
            elif looped:
                variables[looped[1]] = looped[2]
            line = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), line)
            head = [w for w in line.split() if not ASSIGNMENT.match(w)][:1]
            if head and head[0] in LAUNCHERS:  # not the layout table and its prose
                words = shlex.split(line, comments=True)
                env = dict(w.split("=", 1) for w in words if ASSIGNMENT.match(w) and words.index(w) < words.index(head[0]))
                yield env, words[words.index(head[0]):]


STORY_RUNS = os.path.join(os.path.dirname(ROOT), "shared", "story", "runs")


def script_of(words):
    """(script name, its arguments, ranks) of a python or torchrun command; None for python -m."""
    at = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
    if at is None or "-m" in words[:at]:
        return None
    flags = dict(w[2:].split("=", 1) for w in words[1:at] if w.startswith("--") and "=" in w)
    ranks = int(flags.get("nproc_per_node", 1)) * int(flags.get("nnodes", 1)) if words[0] == "torchrun" else 1
    return os.path.basename(words[at])[:-3], words[at + 1:], ranks


def parse_only(name, args):
    """Run the script's own flag parsing on args (unknown flags, types, choices, presets), nothing else."""
    module = importlib.import_module(name)
    owner = module if hasattr(module, "parse_config") else resolve  # train.py parses in resolve.py

    def parse(*a, **k):
        raise Parsed(cli.parse_config(*a, **k))
    with mock.patch.object(owner, "parse_config", parse), pytest.raises(Parsed):
        module.main(args)


def check(env, words, capsys, monkeypatch):
    """A train.py line runs with --dry_run on its ranks; any other script's line parses."""
    found = script_of(words)
    if found is None:
        return
    name, args, ranks = found
    assert name in flagdoc.SCRIPTS, f"{' '.join(words)}: no such script"
    if name == "train":
        monkeypatch.setenv("WORLD_SIZE", env.get("WORLD_SIZE", str(ranks)))
        capsys.readouterr()
        train.main(args + ["--dry_run"])
        plan = json.loads(capsys.readouterr().out)
        assert plan["derived"]["ranks"] == int(env.get("WORLD_SIZE", ranks)), words
    else:
        parse_only(name, args)


def test_every_readme_command_runs_or_parses(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    lines = list(command_lines("README.md"))
    assert len(lines) >= 12, lines  # the quick start and the story's workflow
    for env, words in lines:
        if words[0] == "make":
            dry = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True)
            assert dry.returncode == 0, dry.stderr
            continue
        check(env, words, capsys, monkeypatch)


def test_the_demo_commands_parse(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    dry = subprocess.run(["make", "-n", "demo", "BIN=BIN", "VENV=.venv", "DEMO_SEEDS=42"], cwd=ROOT,
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    segments = []
    for line in dry.stdout.replace("\\\n", " ").replace("$s", "42").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        segments.append([])
        for token in lexer:
            if token in (";", "&&", "||", "do", "done"):
                segments.append([])
            else:
                segments[-1].append(token)
    commands = [["python", *w[1:]] for w in segments if w and w[0] == "BIN/python"]
    assert [script_of(c)[0] for c in commands] == ["prepare_data", "train", "eval", "train", "eval", "sample", "compare"]
    for words in commands:
        check({}, words, capsys, monkeypatch)


def test_every_docs_command_parses(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    for path in DOCS[1:]:
        if path == flagdoc.PATH:  # its blocks are usage lines, not commands
            continue
        for env, words in command_lines(path):
            # PATH/runs/NAME: one of the story's run directories (../shared/story/runs beside the clone)
            words = [os.path.join(STORY_RUNS, w[len("PATH/runs/"):]) if w.startswith("PATH/runs/") else w
                     for w in words]
            if any(w.startswith(STORY_RUNS) and not os.path.isdir(w) for w in words):
                continue  # a directory of the reader's own (a copy under another name): not here
            if script_of(words) is not None:
                name, args, _ = script_of(words)
                if f"benchmarks/{name}.py" in words:  # a benchmark script: its own flags parse too
                    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
                else:
                    assert name in flagdoc.SCRIPTS, f"{path}: {' '.join(words)}"
                parse_only(name, args)


def test_a_renamed_flag_fails_the_check(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(UsageError, match="unknown flag --eval_token "):
        check({}, ["python", "eval.py", "out/best", "--eval_token=5"], capsys, monkeypatch)
    with pytest.raises(UsageError, match="unknown flag --grad_clp"):
        check({}, ["torchrun", "--nproc_per_node=8", "train.py", "--grad_clp=3.5"], capsys, monkeypatch)
