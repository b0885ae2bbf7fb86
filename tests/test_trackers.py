"""--tracker: what TensorBoard and wandb receive equals the run directory's record (docs/ecosystem.md, Trackers).

TensorBoard is read back from its event files with TensorBoard's own readers; wandb runs for real
in offline mode and is read back from its offline run file (read_wandb below). A wandb that fails
mid-run is a fake module put in sys.modules, the only way to make the real one fail on cue.
Both packages come from requirements-dev.txt.
"""

import glob
import hashlib
import json
import os
import struct
import sys
import types

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.util import tensor_util

import train
from gpt_interventions import loader
from gpt_interventions.trackers import scalars
from helpers import cli, read_metrics, tiny_flags

# a restart exercises the checkpoint at step 4, rows 5..7 logged again, and validation at 6
RESTART = dict(max_iters=8, eval_interval=6, checkpoint_interval=4, charts=False)


def go_offline(root, monkeypatch):
    """wandb with no network, writing its runs under root/wandb_dir; returns that directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(root / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    os.makedirs(root / "wandb_dir")
    return root / "wandb_dir"


def wandb_teardown():
    """wandb reads the environment once a process: forget it, as a new process would."""
    import wandb
    wandb.teardown()


@pytest.fixture
def offline(tmp_path, monkeypatch):
    yield go_offline(tmp_path, monkeypatch)
    wandb_teardown()


@pytest.fixture(scope="module")
def tracked(data_dir, tmp_path_factory):
    """A finished tiny run (validation at steps 3 and 6, charts) sent to both trackers."""
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        go_offline(root, mp)
        train.main(tiny_flags(data_dir, str(root / "run"), tracker="tensorboard,wandb", max_iters=6, eval_interval=3))
        wandb_teardown()
    return str(root / "run"), root / "wandb_dir"


def tb_scalars(run_dir):
    """{tag: [(step, value)]} as EventAccumulator reads out_dir/tensorboard/ (restarts purged)."""
    acc = event_accumulator.EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_plugin_scalars(run_dir):
    """The same through the loader TensorBoard's server uses without its Rust data server."""
    acc = plugin_event_accumulator.EventAccumulator(os.path.join(run_dir, "tensorboard"),
                                                    size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"] if tag.split("/")[0] in ("train", "val")}


def expected_scalars(rows):
    """metrics.jsonl's rows as the scalars a tracker should hold, in float32 as TensorBoard stores them."""
    out = {}
    for row in rows:
        for tag, value in scalars(row).items():
            out.setdefault(tag, []).append((row["step"], float(np.float32(value))))
    return out


def attempt(path):
    """Order of the offline runs: wandb names each offline-run-YYYYMMDD_HHMMSS-ID and adds -1, -2, ...
    when attempts start in the same second (plain path order would put ID-1/ before ID/)."""
    name = os.path.basename(os.path.dirname(path))
    stamp, rest = name[len("offline-run-"):].split("-", 1)
    return stamp, int(rest.split("-")[1]) if "-" in rest else 0


def read_wandb(wandb_dir):
    """History rows {step: {key: value}} and config of every offline run under wandb_dir, in order.

    An offline run's .wandb file is a 7-byte W&B header, then LevelDB's log format: 32 KiB blocks
    of records, each a 7-byte header (crc32c, length as little-endian uint16, type: 1 full,
    2 first, 3 middle, 4 last fragment) and its bytes; each whole record is a wandb Record protobuf.
    """
    from wandb.proto import wandb_internal_pb2
    history, config = [], {}
    for path in sorted(glob.glob(os.path.join(str(wandb_dir), "wandb", "offline-run-*", "run-*.wandb")), key=attempt):
        with open(path, "rb") as f:
            data = f.read()
        assert data[:4] == b":W&B"
        pos, record = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            record += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind not in (1, 4):
                continue
            r = wandb_internal_pb2.Record()
            r.ParseFromString(record)
            record = b""
            items = {"history": lambda r: r.history.item, "config": lambda r: r.config.update}
            which = r.WhichOneof("record_type")
            if which in items:
                values = {_key(i): json.loads(i.value_json) for i in items[which](r)}
                (history.append(values) if which == "history" else config.update(values))
    return history, config


def _key(item):
    """A history or config item's key: a string, or a tuple for a value within one (an image's sha256)."""
    return item.key or (item.nested_key[0] if len(item.nested_key) == 1 else tuple(item.nested_key))


def wandb_scalars(history):
    out = {}
    for row in history:
        for key, value in row.items():
            if isinstance(key, str) and key.split("/")[0] in ("train", "val"):
                out.setdefault(key, []).append((row["_step"], value))
    return out


def test_tensorboard_holds_every_row_the_config_and_the_charts(tracked):
    run_dir, _ = tracked
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert tb_scalars(run_dir) == expected_scalars(rows)  # every row, every step once, float32-equal
    assert "train/mfu" not in tb_scalars(run_dir)  # None on the CPU: left out, not 0

    acc = event_accumulator.EventAccumulator(os.path.join(run_dir, "tensorboard"),
                                             size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    [text] = acc.Tensors("config/text_summary")  # torch's add_text adds /text_summary
    markdown = tensor_util.make_ndarray(text.tensor_proto).item().decode()
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.loads("\n".join(line[4:] for line in markdown.splitlines())) == json.load(f)
    charts = sorted(glob.glob(os.path.join(run_dir, "charts", "*.png")))
    assert len(charts) == 5 and sorted(acc.Tags()["images"]) == sorted(
        "charts/" + os.path.basename(p)[:-4] for p in charts)
    for path in charts:
        [image] = acc.Images("charts/" + os.path.basename(path)[:-4])
        with open(path, "rb") as f:
            png = f.read()
        assert image.encoded_image_string == png  # the PNG itself, byte for byte
        # its size is the PNG header's (a chart grows taller by its legend's lines below the axes)
        assert (image.step, image.width, image.height) == (6, *struct.unpack(">II", png[16:24]))
        assert image.width == 800 and image.height >= 450


def test_wandb_offline_holds_every_row_the_config_and_the_charts(tracked):
    run_dir, wandb_dir = tracked
    rows = read_metrics(run_dir)
    history, config = read_wandb(wandb_dir)
    expect = {}
    for row in rows:
        for tag, value in scalars(row).items():
            expect.setdefault(tag, []).append((row["step"], value))
    assert wandb_scalars(history) == expect  # float64 through JSON: exactly metrics.jsonl's values
    with open(os.path.join(run_dir, "config.json")) as f:
        meta = json.load(f)
    assert {k: config[k] for k in meta} == meta
    with open(os.path.join(run_dir, "wandb_run.json")) as f:
        run_id = json.load(f)["id"]
    assert glob.glob(os.path.join(str(wandb_dir), "wandb", f"offline-run-*-{run_id}*", f"run-{run_id}.wandb"))
    last = history[-1]
    for path in glob.glob(os.path.join(run_dir, "charts", "*.png")):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        assert last[("charts/" + os.path.basename(path)[:-4], "sha256")] == digest
        assert last["_step"] == 6


def interrupt_at(monkeypatch, step):
    """Die while step `step` (1-indexed) runs, as a kill -9 would: no checkpoint, no closing."""
    batch = loader.TrainLoader.batch

    def crash(self, s, micro):
        if s == step - 1:
            raise KeyboardInterrupt
        return batch(self, s, micro)
    monkeypatch.setattr(loader.TrainLoader, "batch", crash)


def test_a_restarted_run_gives_each_step_once(data_dir, tmp_path, offline, monkeypatch):
    import wandb
    out = str(tmp_path / "run")
    flags = tiny_flags(data_dir, out, tracker="tensorboard,wandb", **RESTART)
    for step in (3, 8):  # before the first checkpoint (all rows again), then after the one at 4
        with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
            interrupt_at(mp, step)
            train.main(flags)
        wandb.finish()  # what the killed process's exit does to its wandb run
    train.main(flags)  # the same command: restart in place
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))

    # what the killed attempts logged is on disk, and read once: steps 1..2 and 5..7 were written twice
    files = glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    assert len(files) == 3
    assert tb_scalars(out) == expected_scalars(rows)
    assert tb_plugin_scalars(out) == expected_scalars(rows)  # its first START is not a restart: see trackers.py

    # wandb: one run id, three offline attempts; each step once, the first value sent for it
    history, _ = read_wandb(offline)
    assert len(glob.glob(os.path.join(str(offline), "wandb", "offline-run-*"))) == 3
    # each attempt's directory holds run-ID.wandb (its name gains -1, -2 when attempts start in the same second)
    assert len({os.path.basename(p)[len("run-"):-len(".wandb")]
                for p in glob.glob(os.path.join(str(offline), "wandb", "offline-run-*", "run-*.wandb"))}) == 1
    got = wandb_scalars(history)
    assert {tag: [s for s, _ in pts] for tag, pts in got.items()} == \
        {tag: [s for s, _ in pts] for tag, pts in expected_scalars(rows).items()}
    assert got["train/loss"] == [(r["step"], r["loss"]) for r in rows if "loss" in r]  # a bitwise resume


class FakeWandb(types.ModuleType):
    """wandb as this project calls it; its run's log raises at step `fail_at` as on a lost network."""

    def __init__(self, fail_at):
        super().__init__("wandb")
        self.fail_at, self.calls = fail_at, []

    def Settings(self, **kw):
        return kw

    def init(self, **kw):
        self.calls.append(("init", kw))
        fake = self

        class Run:
            config = types.SimpleNamespace(update=lambda c, **kw: fake.calls.append(("config", c)))

            def log(self, values, step):
                fake.calls.append(("log", step))
                if step == fake.fail_at:
                    raise ConnectionError("wandb.ai unreachable\nretry later")

            def finish(self):
                fake.calls.append(("finish",))
        return Run()


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_run_goes_on(data_dir, tmp_path, monkeypatch):
    fake = FakeWandb(fail_at=3)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for name in ("WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    out = str(tmp_path / "run")
    train.main(tiny_flags(data_dir, out, tracker="tensorboard,wandb", max_iters=4, charts=False))
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 5))
    with open(os.path.join(out, "log.txt")) as f:
        failed = [line for line in f if line.startswith("tracker")]
    assert failed == ["tracker wandb failed while logging step 3 (ConnectionError: wandb.ai unreachable retry "
                      "later); the run goes on without it (metrics.jsonl has every row)\n"]
    with open(os.path.join(out, "wandb_run.json")) as f:
        run_id = json.load(f)["id"]
    assert fake.calls[0] == ("init", dict(project="gpt-interventions", name="run", id=run_id, resume="allow",
                                          dir=out, settings={"console": "off"}))
    assert [c for c in fake.calls[1:]] == [("config", fake.calls[1][1]), ("log", 1), ("log", 2), ("log", 3)]
    assert tb_scalars(out) == expected_scalars(rows)  # the other tracker got everything


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "tensorboard,wandb"])
def test_a_missing_package_is_refused_in_one_line_before_anything_is_written(tracker, data_dir, tmp_path,
                                                                            monkeypatch, capsys):
    missing = tracker.split(",")[-1]
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    out = tmp_path / "run"
    code, err = cli(train.main, tiny_flags(data_dir, str(out), tracker=tracker), capsys)
    assert code == 2 and err == (f"error: --tracker={missing} needs the {missing} package, which is not installed: "
                                 f"pip install {missing} (or choose --tracker=none)\n")
    assert not out.exists()


@pytest.mark.parametrize("tracker", ["tensorbord", "", "none,wandb", "wandb;tensorboard"])
def test_an_unknown_tracker_is_refused(tracker, data_dir, tmp_path, capsys):
    code, err = cli(train.main, tiny_flags(data_dir, str(tmp_path / "run"), tracker=tracker), capsys)
    assert code == 2 and err == (f"error: --tracker={tracker!r}: give none, tensorboard, wandb or "
                                 "tensorboard,wandb\n")
    assert not (tmp_path / "run").exists()


def test_a_run_with_experts_sends_each_routing_share(data_dir, tmp_path):
    """expert_frac (a list of layers of experts) reaches TensorBoard as one scalar per layer and expert."""
    out = str(tmp_path / "run")
    train.main(tiny_flags(data_dir, out, tracker="tensorboard", n_expert=2, max_iters=2, charts=False))
    rows = read_metrics(out)
    got = tb_scalars(out)
    assert got == expected_scalars(rows)
    frac = [r["expert_frac"] for r in rows if "loss" in r]
    assert got["train/expert_frac/1/0"] == [(s + 1, float(np.float32(f[1][0]))) for s, f in enumerate(frac)]
