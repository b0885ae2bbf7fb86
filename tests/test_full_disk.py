"""A full disk: a failed checkpoint write or log append stops the run with one line, the
previous checkpoint intact, and a resume after freeing space loses nothing (docs/clusters.md, What a run can count on)."""

import errno
import glob
import io
import os

import pytest
import torch

import eval as eval_script
import train
from gpt_interventions import atomic, checkpoint, rundir
from gpt_interventions.errors import run_main
from helpers import EXACT, ROOT, assert_same_run, ckpt_of, cli, read_metrics, tiny_flags, torchrun


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run that an interrupted one must match bit for bit."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    train.main(tiny_flags(data_dir, out, **EXACT))
    return out


class FullDisk(io.RawIOBase):
    """A file that takes 1000 bytes, then fails as a full disk does."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def writable(self):
        return True

    def write(self, b):
        self.n += len(b)
        if self.n > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(b)


@pytest.mark.parametrize("where", ["torch.save", "write", "os.replace"])
def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_previous_one(where, data_dir, reference, tmp_path,
                                                                            monkeypatch, capsys):
    out = str(tmp_path / "run")
    path = os.path.join(out, "ckpt.pt")
    seen = {"saves": 0, "before": None}
    save, replace = torch.save, os.replace

    def full(*args):  # the second checkpoint (step 8) hits a full disk
        seen["saves"] += 1
        if seen["saves"] == 2:
            seen["before"] = open(path, "rb").read()
            return True
    if where == "os.replace":
        def failing_replace(src, dst):
            if dst == path and full():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return replace(src, dst)
        monkeypatch.setattr(atomic.os, "replace", failing_replace)
    else:
        def failing_save(obj, f, *args, **kwargs):
            if full():
                if where == "torch.save":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                f = FullDisk(f)
            return save(obj, f, *args, **kwargs)
        monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    code, err = cli(train.main, tiny_flags(data_dir, out, **EXACT), capsys)
    assert code == 1 and err == (f"error: cannot write checkpoint {path} at step 8 (No space left on device); "
                                 "the previous checkpoint, at step 4, is intact\n")
    assert open(path, "rb").read() == seen["before"] and ckpt_of(out)["step"] == 4
    assert not glob.glob(os.path.join(out, "*.tmp.*"))
    monkeypatch.undo()  # space freed: the run resumes and loses nothing
    train.main(tiny_flags(data_dir, out, resume=True, **EXACT))
    assert_same_run(reference, out)


@pytest.mark.parametrize("target, marker", [("metrics.jsonl", '"step": 6,'), ("log.txt", "step 6/12")])
def test_a_failed_log_append_stops_the_run_and_a_resume_loses_nothing(target, marker, data_dir, reference,
                                                                      tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    path = os.path.join(out, target)

    class HalfThenFull(io.StringIO):  # the row of step 6: half of it lands, then the disk is full
        def __init__(self, f):
            super().__init__()
            self.f = f

        def write(self, text):
            if marker in text:
                self.f.write(text[: len(text) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(text)

        def __exit__(self, *exc):
            self.f.close()

    def failing_open(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        return HalfThenFull(f) if file == path and "a" in mode else f
    monkeypatch.setattr(rundir, "open", failing_open, raising=False)  # rundir's appends only
    code, err = cli(train.main, tiny_flags(data_dir, out, **EXACT), capsys)
    assert code == 1 and err == (f"error: cannot append to {path} (No space left on device), stopped after "
                                 "step 7; the checkpoint at step 4 is intact: free space, then resume with: "
                                 f"python train.py --resume --out_dir={out}\n")
    assert ckpt_of(out)["step"] == 4
    monkeypatch.undo()  # space freed: the resume drops the rows after step 4, the cut one too
    train.main(tiny_flags(data_dir, out, resume=True, **EXACT))
    assert_same_run(reference, out)
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, 13))


@pytest.mark.slow
def test_under_torchrun_a_failed_append_on_rank_0_stops_every_rank_with_one_line(data_dir, tmp_path):
    out = str(tmp_path / "run")
    proc = torchrun(os.path.join(ROOT, "tests", "fault_train.py"), tiny_flags(data_dir, out, **EXACT),
                    FAULT="full_log:6")
    assert proc.returncode != 0
    path = os.path.join(out, "metrics.jsonl")
    assert (f"error: cannot append to {path} (No space left on device), stopped after step 7; the checkpoint "
            "at step 4 is intact" in proc.stderr), proc.stderr[-3000:]
    assert "error: rank 0 could not append to its logs; see its error" in proc.stderr  # rank 1, same step
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert ckpt_of(out)["step"] == 4


def test_a_full_disk_anywhere_else_is_one_line_and_exit_1(data_dir, finished_run, tmp_path, monkeypatch, capsys):
    # run_main's fallback for the writes without their own handling: config.json at a run's start,
    # eval.py's ledger row, ...
    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(train, "write_json", full)
    out = str(tmp_path / "run")
    code, err = cli(train.main, tiny_flags(data_dir, out, **EXACT), capsys)
    path = os.path.join(out, "config.json")
    assert code == 1 and err == (f"error: cannot write {path} (No space left on device); free space or choose "
                                 "another output directory, then run again\n")
    ledger = str(tmp_path / "results.jsonl")
    monkeypatch.setattr(eval_script, "open", full, raising=False)
    code, err = cli(eval_script.main, [finished_run, f"--data_dir={data_dir}", "--dataset=syn", f"--ledger={ledger}"],
                    capsys)
    assert code == 1 and err.startswith(f"error: cannot write {ledger} (No space left on device);")
    assert err.count("\n") == 1


def test_other_os_errors_keep_their_traceback():
    def broken(argv):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "somewhere")
    with pytest.raises(OSError):
        run_main(broken, [])
