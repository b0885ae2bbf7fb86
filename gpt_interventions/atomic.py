"""Atomic file writes: after a crash a file is the old one or the new one, never half of either."""

import json
import os


def atomic_write(path, write_fn):
    """Write through a temp file in the same directory, fsync, then rename over `path`.

    A crash mid-write leaves the previous file intact and at worst a stray .tmp file, which is
    never read as a checkpoint.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
