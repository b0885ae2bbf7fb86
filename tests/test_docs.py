"""The documents against the code: docs/flags.md is what the scripts' dataclasses generate, and every
command line README.md shows runs (offline, on the CPU) or is checked with --help / --dry_run."""

import os

from gpt_interventions import flagdoc
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
