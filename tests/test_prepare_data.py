"""prepare_data.py: exact documents, deterministic disjoint splits, the hub path, resume, bad input."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import prepare_data
from gpt_interventions import shards, tokenizer
from gpt_interventions.errors import UsageError, run_main
from helpers import ROOT

FINEWEB = os.path.join(ROOT, "assets", "corpus", "fineweb-sample-300.parquet")


def words_corpus(path, n_docs, seed=0, start=0):
    """A .jsonl corpus of n_docs short documents with ids doc-<start+i>; returns {id: text}."""
    rng = np.random.default_rng(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "the", "of", "model", "loss", "\n", "é"]
    docs = {f"doc-{start + i}": " ".join(rng.choice(vocab, rng.integers(20, 80))) for i in range(n_docs)}
    with open(path, "w") as f:
        for doc_id, text in docs.items():
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return docs


def prepare(tmp_path, *flags):
    prepare_data.main([f"--data_dir={tmp_path / 'data'}", "--num_proc=1", *flags])
    return tmp_path / "data"


def split_docs(data_dir, dataset, split):
    """The split's documents decoded from its shards (each starts with the EOT separator)."""
    enc = tokenizer.get_tokenizer()
    tokens = np.concatenate([shards.read_shard(p) for p, _ in shards.find_shards(str(data_dir), dataset, split)])
    assert tokens[0] == tokenizer.EOT
    cuts = np.flatnonzero(tokens == tokenizer.EOT)
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(cuts, [*cuts[1:], tokens.size])]


def shard_bytes(data_dir, dataset):
    root = os.path.join(data_dir, dataset)
    return {f: open(os.path.join(root, f), "rb").read() for f in sorted(os.listdir(root)) if f.endswith(".bin")}


def test_sample_shards_decode_to_exactly_the_documents(tmp_path):
    out = prepare(tmp_path, "--dataset=sample")
    with gzip.open(prepare_data.SAMPLE, "rt") as f:
        corpus = [json.loads(line)["text"] for line in f]
    splits = {s: split_docs(out, "sample", s) for s in ("train", "val", "test")}
    assert sorted(sum(splits.values(), [])) == sorted(corpus)  # every document once, nothing else
    meta = json.load(open(out / "sample" / "meta.json"))
    assert sum(meta["splits"][s]["tokens"] for s in splits) == 478_224 + 1000  # + one EOT per doc
    for s, docs in splits.items():
        assert meta["splits"][s]["documents"] == len(docs)
    assert 0.03 < len(splits["test"]) / 1000 < 0.08 and 0.03 < len(splits["val"]) / 1000 < 0.08
    assert meta["tokenizer"]["name"] == "gpt2" and meta["source"]["kind"] == "local"


def test_same_arguments_give_identical_bytes_whatever_num_proc(tmp_path):
    corpus = tmp_path / "c.jsonl"
    words_corpus(corpus, 300)
    a = prepare(tmp_path / "a", "--dataset=w", f"--input={corpus}", "--shard_tokens=5000")
    prepare_data.main([f"--data_dir={tmp_path / 'b'}", "--num_proc=2", "--dataset=w", f"--input={corpus}",
                       "--shard_tokens=5000"])
    first = shard_bytes(a, "w")
    assert len([f for f in first if f.startswith("train_")]) > 2  # several shards
    assert first == shard_bytes(tmp_path / "b", "w")
    assert open(a / "w" / "meta.json").read() == open(tmp_path / "b" / "w" / "meta.json").read()


def test_splits_are_disjoint_and_stable_when_max_tokens_changes(tmp_path):
    files = [tmp_path / f"part{i}.jsonl" for i in range(3)]
    texts = {}
    for i, path in enumerate(files):
        texts.update(words_corpus(path, 150, seed=i, start=1000 * i))
    glob_ = str(tmp_path / "part*.jsonl")
    budgets = ["--val_tokens=700", "--test_tokens=900"]
    full = prepare(tmp_path, "--dataset=full", f"--input={glob_}", *budgets)
    capped = prepare(tmp_path, "--dataset=capped", f"--input={glob_}", "--max_tokens=3000", *budgets)
    a, b = shard_bytes(full, "full"), shard_bytes(capped, "capped")
    assert a["val_000000.bin"] == b["val_000000.bin"] and a["test_000000.bin"] == b["test_000000.bin"]
    train_full, train_capped = shards.read_shard(str(full / "full" / "train_000000.bin")), \
        shards.read_shard(str(capped / "capped" / "train_000000.bin"))
    assert train_capped.size == 3000 and (train_full[:3000] == train_capped).all()
    meta = json.load(open(capped / "capped" / "meta.json"))
    assert meta["splits"]["val"]["tokens"] == 700 and meta["splits"]["test"]["tokens"] == 900
    assert len(meta["files"]) < 3  # enough training tokens: the last file was never read
    train_docs = set(split_docs(full, "full", "train"))
    held = split_docs(full, "full", "val") + split_docs(full, "full", "test")
    assert not train_docs & set(held)
    # the test split is the held-out documents of the shortest prefix of the files that holds
    # test_tokens of them, in split-key order
    pool_files = json.load(open(full / "full" / "meta.json"))["pool_files"]["test"]
    pool = [i for i in texts if int(i.split("-")[1]) < 1000 * pool_files]
    by_key = sorted(pool, key=lambda i: prepare_data.split_key(i, texts[i]))
    first = split_docs(full, "full", "test")[0]
    assert first == texts[by_key[0]]


def test_split_of_a_document_depends_only_on_its_identity(tmp_path):
    """Reading the same documents from files in another order or grouping changes no split."""
    docs = words_corpus(tmp_path / "all.jsonl", 200)
    items = list(docs.items())
    (tmp_path / "re").mkdir()
    for n, part in enumerate([items[120:], items[:120][::-1]]):
        with open(tmp_path / "re" / f"{n}.jsonl", "w") as f:
            f.writelines(json.dumps({"id": i, "text": t}) + "\n" for i, t in part)
    one = prepare(tmp_path, "--dataset=one", f"--input={tmp_path / 'all.jsonl'}")
    two = prepare(tmp_path, "--dataset=two", f"--input={tmp_path / 're' / '*.jsonl'}")
    for split in ("train", "val", "test"):
        assert sorted(split_docs(one, "one", split)) == sorted(split_docs(two, "two", split))
    assert shard_bytes(one, "one")["test_000000.bin"] == shard_bytes(two, "two")["test_000000.bin"]


# --- the FineWeb path against a local fake of the hub ------------------------------------------


class FakeHub:
    """Stands in for huggingface_hub's HfApi and hf_hub_download, serving local parquet files."""

    def __init__(self, files):
        self.files, self.downloads = files, []

    def api(self):
        hub = self

        class Api:
            def dataset_info(self, repo, revision=None):
                assert repo == "HuggingFaceFW/fineweb"
                return type("Info", (), {"sha": "f" * 40 if revision == "main" else revision})()

            def list_repo_files(self, repo, repo_type=None, revision=None):
                assert repo_type == "dataset" and revision == "f" * 40
                return ["README.md", *hub.files]
        return Api()

    def download(self, repo, filename, repo_type=None, revision=None):
        assert repo_type == "dataset" and revision == "f" * 40
        self.downloads.append(filename)
        return self.files[filename]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub
    import pyarrow.parquet as pq
    table = pq.read_table(FINEWEB)
    files = {}
    for i in range(2):  # two FineWeb-layout shards of 150 documents each
        path = tmp_path / f"{i:03d}_00000.parquet"
        pq.write_table(table.slice(150 * i, 150), path)
        files[f"sample/10BT/{i:03d}_00000.parquet"] = str(path)
    hub = FakeHub(files)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download)
    return hub


def test_fineweb_from_the_hub_is_pinned_and_downloads_only_what_it_needs(tmp_path, fake_hub):
    budgets = ["--val_tokens=2000", "--test_tokens=4000"]
    out = prepare(tmp_path, "--dataset=fineweb", "--max_tokens=20000", *budgets)
    assert fake_hub.downloads == ["sample/10BT/000_00000.parquet"]
    meta = json.load(open(out / "fineweb" / "meta.json"))
    assert meta["source"] == {"kind": "hub", "repo": "HuggingFaceFW/fineweb", "subset": "sample/10BT",
                              "revision": "main", "revision_sha": "f" * 40}
    assert meta["pool_files"] == {"test": 1, "val": 1} and meta["splits"]["train"]["tokens"] == 20000
    # all of it: the second file is downloaded too, and val/test do not change
    everything = prepare(tmp_path / "all", "--dataset=fineweb", *budgets)
    assert fake_hub.downloads[1:] == list(fake_hub.files)
    a, b = shard_bytes(out, "fineweb"), shard_bytes(everything, "fineweb")
    assert a["test_000000.bin"] == b["test_000000.bin"] and a["val_000000.bin"] == b["val_000000.bin"]
    # the test split holds the FineWeb documents with the smallest split keys of the first file
    import pyarrow.parquet as pq
    rows = pq.read_table(fake_hub.files["sample/10BT/000_00000.parquet"]).to_pylist()
    first = min(rows, key=lambda r: prepare_data.split_key(r["id"], r["text"]))
    assert split_docs(out, "fineweb", "test")[0] == first["text"]


def test_hub_offline_is_one_line_that_names_the_local_route(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real huggingface_hub refuses to connect
    with pytest.raises(SystemExit) as e:
        run_main(prepare_data.main, ["--dataset=fineweb", f"--data_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "HuggingFaceFW/fineweb" in err and "--input=" in err


# --- resume and interruption -------------------------------------------------------------------


def test_interrupted_run_resumes_and_leaves_no_complete_looking_split(tmp_path, monkeypatch):
    for i in range(3):
        words_corpus(tmp_path / f"p{i}.jsonl", 100, seed=i, start=1000 * i)
    flags = ["--dataset=w", f"--input={tmp_path / 'p*.jsonl'}"]
    clean = prepare(tmp_path / "clean", *flags)

    calls = []
    encode = prepare_data.encode_batch

    def crash_in_third_file(docs):
        calls.append(docs[0][0])
        if docs[0][0] == "doc-2000":
            raise KeyboardInterrupt
        return encode(docs)
    monkeypatch.setattr(prepare_data, "encode_batch", crash_in_third_file)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, *flags)
    root = tmp_path / "data" / "w"
    assert not [f for f in os.listdir(root) if f.endswith((".bin", ".json"))]  # nothing looks done
    with pytest.raises(UsageError, match="no train shards"):
        shards.find_shards(str(tmp_path / "data"), "w", "train")

    calls.clear()
    monkeypatch.setattr(prepare_data, "encode_batch", lambda docs: calls.append(docs[0][0]) or encode(docs))
    prepare(tmp_path, *flags)
    assert calls == ["doc-2000"]  # the two finished files came from their caches
    assert shard_bytes(tmp_path / "data", "w") == shard_bytes(clean, "w")
    assert not os.path.exists(root / ".cache") and not os.path.exists(root / ".staging")


def test_crash_while_swapping_shards_in_is_detected(tmp_path):
    words_corpus(tmp_path / "c.jsonl", 100)
    out = prepare(tmp_path, "--dataset=w", f"--input={tmp_path / 'c.jsonl'}")
    os.remove(out / "w" / "meta.json")  # as if stopped between the moves and meta.json
    os.makedirs(out / "w" / ".staging")
    with pytest.raises(UsageError, match="half-prepared"):
        shards.find_shards(str(out), "w", "train")


# --- bad input: one line, exit 2, nothing overwritten ------------------------------------------


def fails(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(prepare_data.main, ["--num_proc=1", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    return err


def test_bad_inputs(tmp_path, capsys):
    d = f"--data_dir={tmp_path / 'data'}"
    fails(["--dataset=nosuch", d], "unknown dataset 'nosuch': known are sample, fineweb, fineweb-edu", capsys)
    fails([d], "--dataset is required", capsys)
    fails(["--dataset=x", f"--input={tmp_path}/missing*.jsonl", d], "matches no file", capsys)
    (tmp_path / "notext.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    fails(["--dataset=x", f"--input={tmp_path / 'notext.jsonl'}", d], "line 1 has no 'text' field", capsys)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    fails(["--dataset=x", f"--input={tmp_path / 'bad.jsonl'}", d], "line 1 is not valid JSON", capsys)
    fails(["--dataset=x", f"--input={FINEWEB}", "--text_field=body", d],
          "has no column 'body' (columns: text, id, url)", capsys)
    (tmp_path / "empty.jsonl").write_text("")
    fails(["--dataset=x", f"--input={tmp_path / 'empty.jsonl'}", d], "holds no documents", capsys)
    (tmp_path / "one.txt").write_text("a single document")
    fails(["--dataset=x", f"--input={tmp_path / 'one.txt'}", d], "the corpus is too small", capsys)
    words_corpus(tmp_path / "small.jsonl", 50)
    fails(["--dataset=x", f"--input={tmp_path / 'small.jsonl'}", "--val_tokens=100000", "--test_tokens=100000", d],
          "fewer than val_tokens + test_tokens = 200,000", capsys)
    fails(["--dataset=x", f"--input={tmp_path / 'small.jsonl'}", "--val_tokens=1000", d],
          "set both --val_tokens and --test_tokens", capsys)
    fails(["--dataset=../up", d], "is not a plain name", capsys)
    fails(["--dataset=sample", "--shard_token=5", d], "did you mean --shard_tokens?", capsys)


def test_other_settings_never_overwrite_a_prepared_dataset(tmp_path, capsys):
    words_corpus(tmp_path / "c.jsonl", 100)
    out = prepare(tmp_path, "--dataset=w", f"--input={tmp_path / 'c.jsonl'}")
    before = shard_bytes(out, "w")
    fails(["--dataset=w", f"--input={tmp_path / 'c.jsonl'}", "--max_tokens=100", f"--data_dir={out}"],
          "was prepared with other settings (max_tokens: 0 -> 100)", capsys)
    assert shard_bytes(out, "w") == before
    prepare(tmp_path, "--dataset=w", f"--input={tmp_path / 'c.jsonl'}", "--max_tokens=100", "--overwrite")
    assert shards.read_header(str(out / "w" / "train_000000.bin")) == 100


def test_tokenizer_works_with_networking_unavailable(tmp_path):
    code = ("import socket\n"
            "def refuse(*a, **k): raise OSError('network disabled in this test')\n"
            "socket.socket.connect = refuse; socket.create_connection = refuse; socket.getaddrinfo = refuse\n"
            "from gpt_interventions import tokenizer\n"
            "enc = tokenizer.get_tokenizer()\n"
            "print(enc.encode_ordinary('Hello world'), enc.n_vocab)\n")
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    env.update(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path), TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[15496, 995] 50257"


def test_training_reads_the_prepared_sample(tmp_path):
    import train
    out = prepare(tmp_path, "--dataset=sample")
    train.main([f"--data_dir={out}", "--dataset=sample", f"--out_dir={tmp_path / 'run'}", "--n_layer=1",
                "--n_head=1", "--n_embd=16", "--block_size=32", "--batch_size=4", "--total_batch_size=128",
                "--max_iters=2", "--max_tokens=0", "--dtype=float32", "--compile=False", "--device=cpu",
                "--eval_tokens=256", "--log_interval=1"])
    assert os.path.exists(tmp_path / "run" / "ckpt.pt")
    # a val shard that changed after preparation is refused: the test numbers rest on these bytes
    val = out / "sample" / "val_000000.bin"
    raw = bytearray(val.read_bytes())
    raw[-1] ^= 1
    val.write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="does not match the sha256 in meta.json"):
        shards.find_shards(str(out), "sample", "val")
    shutil.rmtree(tmp_path / "run")
