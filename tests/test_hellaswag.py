"""eval.py --task=hellaswag: completion-style HellaSwag accuracy, checked against per-ending
reference computations written here (our model's logits, transformers' GPT2LMHeadModel), its
download, its records, and compare.py's accuracy column and verdicts."""

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
import torch
from helpers import ROOT, cli, eval_rows, fake_run, make_shards, snapshot, tiny_hf, tiny_run

import compare
import eval as eval_script
from gpt_interventions import hellaswag
from gpt_interventions.errors import UsageError
from gpt_interventions.formats import export_book, load_model
from gpt_interventions.tokenizer import get_tokenizer
from model import GPT, GPTConfig

GPT2_VOCAB = 50257
BLOCK = 32  # the tiny models' context

# rowanz/hellaswag's format; the last context is longer than BLOCK, so it is cut from the left
EXAMPLES = [
    {"ind": 4, "ctx": "A man is sitting on a roof. he", "label": 3, "split": "val", "activity_label": "Roofing",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ind": 9, "ctx": "The chef slices the onions and", "label": 0,
     "endings": ["puts them in a hot pan.", "sings.", "climbs a tall ladder to the moon and back again.",
                 "the dog."]},
    {"ind": 12, "ctx": "She ties her shoes, stretches her legs, and", "label": 1,
     "endings": ["eats.", "starts to run down the road.", "reads a long novel about whales.", "is a car."]},
    {"ind": 17, "ctx": "Two kids build a sandcastle on the beach while the waves", "label": 2,
     "endings": ["explode.", "fly away to Paris in a balloon.", "wash over the moat.", "paint the house."]},
    {"ind": 20, "ctx": "How to clean a window. Mix vinegar and water in a bottle.", "label": 0,
     "endings": ["Spray the glass and wipe it with a cloth.", "Drink it.", "Throw the bottle.", "Windows."]},
    {"ind": 31, "ctx": "The orchestra tunes its instruments while the audience finds its seats, reads the "
                       "programme, whispers about the soloist and settles in as the lights dim and the conductor",
     "label": 3, "endings": ["leaves.", "eats a sandwich on the stage.", "sleeps.", "raises the baton."]},
]


@pytest.fixture(scope="module")
def input_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hs") / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return str(path)


def random_weights(model, seed=0):
    """Weights far from a fresh init's, so that the four endings' losses differ clearly."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def reference(logits_of, block_size):
    """(mean-loss choices, summed-loss choices, mean losses) computed one ending at a time: the ids of
    the context and of " " + ending, the context cut from the left so it and the longest ending fit,
    log_softmax of that sequence's logits read at each ending token."""
    enc = get_tokenizer()
    norm, total, means = [], [], []
    for ex in EXAMPLES:
        ctx = enc.encode(ex["ctx"])
        ends = [enc.encode(" " + e) for e in ex["endings"]]
        ctx = ctx[max(0, len(ctx) - (block_size - max(map(len, ends)))):]
        sums, avgs = [], []
        for end in ends:
            logp = torch.log_softmax(logits_of(torch.tensor([ctx + end])).double(), dim=-1)[0]  # (T, vocab)
            s = -sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(end))
            sums.append(s)
            avgs.append(s / len(end))
        norm.append(min(range(4), key=avgs.__getitem__))
        total.append(min(range(4), key=sums.__getitem__))
        means.append(avgs)
    return norm, total, means


def scored(model, path):
    encoded, cut = hellaswag.encode(hellaswag.read_examples(path), model.config.block_size, get_tokenizer())
    return hellaswag.score(model, encoded), cut


def check_against(s, ref):
    norm, total, means = ref
    labels = [e["label"] for e in EXAMPLES]
    assert [int(s.losses[i][0].argmin()) for i in range(len(EXAMPLES))] == norm
    assert [int(s.losses[i][1].argmin()) for i in range(len(EXAMPLES))] == total
    for i, m in enumerate(means):
        assert s.losses[i][0].tolist() == pytest.approx(m, rel=1e-5)
    assert s.examples == len(EXAMPLES)
    assert s.correct_norm == sum(p == y for p, y in zip(norm, labels))
    assert s.correct == sum(p == y for p, y in zip(total, labels))


def test_our_model_scores_as_the_per_ending_reference(input_file):
    model = random_weights(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=GPT2_VOCAB,
                                         dropout=0.0)))
    s, cut = scored(model, input_file)
    ref = reference(lambda x: model(x)[0], BLOCK)
    check_against(s, ref)
    assert cut == 1  # the orchestra's context
    assert len(set(ref[0])) > 1 and ref[0] != ref[1]  # choices that tell the scorings apart


def test_a_hugging_face_gpt2_scores_as_transformers_computes(input_file, tmp_path):
    hf = tiny_hf(tmp_path / "hf", vocab=GPT2_VOCAB)
    model, info = load_model(str(tmp_path / "hf"))
    assert info["source"] == "huggingface"
    s, _ = scored(model, input_file)
    with torch.no_grad():
        check_against(s, reference(lambda x: hf(x).logits, BLOCK))


def test_the_books_format_scores_as_the_model_it_was_exported_from(input_file, tmp_path):
    model = random_weights(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=GPT2_VOCAB,
                                         dropout=0.0, qkv_bias=True)), seed=1)
    export_book(model, str(tmp_path / "book"))
    book, info = load_model(str(tmp_path / "book"))
    assert info["source"] == "book"
    ours, theirs = scored(model, input_file)[0], scored(book, input_file)[0]
    assert (theirs.correct_norm, theirs.correct) == (ours.correct_norm, ours.correct)
    for i, (means, sums) in ours.losses.items():
        assert torch.equal(theirs.losses[i][0], means) and torch.equal(theirs.losses[i][1], sums)


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A 2-step tiny run of train.py with GPT-2's vocabulary: a run directory eval.py records into."""
    root = tmp_path_factory.mktemp("wide")
    data_dir = make_shards(root / "data", train=(2_000,), val=600, test=600)
    return os.path.dirname(tiny_run(data_dir, root / "run", vocab_size=GPT2_VOCAB, eval_tokens=64))


def test_eval_cli_prints_and_records_a_run(wide_run, input_file, tmp_path, capsys):
    ledger = tmp_path / "results.jsonl"
    eval_script.main([wide_run, "--task=hellaswag", f"--input={input_file}", f"--ledger={ledger}", "--json"])
    row = json.loads(capsys.readouterr().out)
    s, cut = scored(load_model(wide_run)[0], input_file)
    assert (row["task"], row["split"], row["examples"], row["truncated"]) == ("hellaswag", "val", 6, cut)
    assert (row["correct_norm"], row["correct"]) == (s.correct_norm, s.correct)
    assert (row["acc_norm"], row["acc"]) == (s.correct_norm / 6, s.correct / 6)
    assert [json.loads(line) for line in ledger.read_text().splitlines()] == [row]
    assert eval_rows(wide_run, "hellaswag/val") == [row]
    eval_script.main([wide_run, "--task=hellaswag", f"--input={input_file}", "--ledger="])
    assert re.fullmatch(rf"hellaswag/val acc_norm {s.acc_norm:.4f} acc {s.acc:.4f} examples 6 model "
                        rf"{re.escape(wide_run)}/ckpt.pt \([0-9.]+s; 1 contexts cut from the left to fit "
                        r"block_size 32\)\n", capsys.readouterr().out)
    # compare.py reads the run's accuracy beside its validation loss (it has no test loss)
    run = compare.load_runs([wide_run], "val")[0]
    assert run.accuracy == s.acc_norm and (run.source, run.loss) == ("val", run.last("val_loss"))


def test_a_loss_evaluation_keeps_the_hellaswag_row_and_reads_only_its_own(wide_run, input_file, tmp_path, capsys):
    eval_script.main([wide_run, "--task=hellaswag", f"--input={input_file}", "--ledger="])
    data_dir = os.path.join(os.path.dirname(wide_run), "data")
    eval_script.main([wide_run, f"--data_dir={data_dir}", "--dataset=syn", "--ledger=", "--json"])
    loss = json.loads(capsys.readouterr().out.splitlines()[-1])
    task = eval_rows(wide_run, "hellaswag/val")
    assert len(task) == 1 and eval_rows(wide_run) == [loss]
    run = compare.load_runs([wide_run])[0]
    assert (run.loss, run.source) == (loss["loss"], "test") and run.accuracy == task[0]["acc_norm"]


def test_reference_loss_rows_ignore_hellaswag_rows_of_the_ledger(tmp_path, capsys):
    base = fake_run(tmp_path, "base", 3.7, dataset="syn", block_size=32)
    ledger = tmp_path / "results.jsonl"
    task = {"model": "gpt2", "task": "hellaswag", "split": "val", "acc_norm": 0.2955, "examples": 10042}
    ledger.write_text(json.dumps(task) + "\n")
    code, err = cli(compare.main, [base, "--reference=gpt2", f"--ledger={ledger}"], capsys)
    assert code == 2 and "no syn/test row" in err
    loss = {"model": "gpt2", "dataset": "syn", "split": "test", "loss": 3.3, "tokens": 1024,
            "config": {"model": {"block_size": 32}}}
    ledger.write_text(json.dumps(loss) + "\n" + json.dumps(task) + "\n")
    compare.main([base, "--reference=gpt2", f"--ledger={ledger}"])
    out = capsys.readouterr().out
    assert "hellaswag" not in out  # no run has an accuracy: the table is as before
    fake_run(tmp_path, "scored", 3.69, hellaswag=0.301, grad_clip=3.5, dataset="syn", block_size=32)
    compare.main([base, str(tmp_path / "scored"), "--reference=gpt2", f"--ledger={ledger}"])
    ref = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("gpt2"))
    assert ref.split()[2:6] == ["(eval.py)", "3.300000", "-0.400000", "0.2955"]


BAD_FILES = [
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0}\nnot json\n', "line 2 is not a JSON object"),
    ('[1, 2]\n', "line 1 is not a JSON object"),
    ('\n{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}\n', "line 2: endings must be a list of 4 strings"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}\n', "line 1: label must be 0, 1, 2 or 3"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": "1"}\n', "line 1: label must be 0, 1, 2 or 3"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": true}\n', "line 1: label must be 0, 1, 2 or 3"),
    ('{"endings": ["b", "c", "d", "e"], "label": 1}\n', "line 1: ctx must be a non-empty string"),
    (b'{"ctx": "\xff"}\n', "line 1 is not a JSON object"),
    ("\n\n", "holds no examples"),
]


@pytest.mark.parametrize("content, message", BAD_FILES)
def test_a_bad_file_is_one_line_exit_2_naming_the_line(content, message, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    tiny_hf(tmp_path / "hf", vocab=GPT2_VOCAB)
    before = snapshot(tmp_path)
    code, err = cli(eval_script.main, [tmp_path / "hf", "--task=hellaswag", f"--input={path}",
                                       f"--ledger={tmp_path / 'r.jsonl'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {path} ") and message in err, err
    assert snapshot(tmp_path) == before


def test_other_refusals(tmp_path, input_file, monkeypatch, capsys):
    tiny_hf(tmp_path / "small")  # vocab 256: cannot read GPT-2 ids; refused before any download
    monkeypatch.setattr(hellaswag, "fetch", lambda url: pytest.fail("downloaded"))
    code, err = cli(eval_script.main, [tmp_path / "small", "--task=hellaswag", f"--data_dir={tmp_path}"], capsys)
    assert code == 2 and err == f"error: the model's vocab_size is 256; HellaSwag is read with the GPT-2 BPE " \
                                f"({GPT2_VOCAB} ids)\n"
    code, err = cli(eval_script.main, [tmp_path / "small", f"--input={input_file}"], capsys)
    assert code == 2 and err == "error: --input is the HellaSwag file of --task=hellaswag\n"
    code, err = cli(eval_script.main, [tmp_path / "small", "--task=hellaswag", f"--input={tmp_path}/no.jsonl"], capsys)
    assert code == 2 and err == f"error: --input={tmp_path}/no.jsonl does not exist\n"
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"ctx": "a", "endings": [" ".join("b" * 40), "c", "d", "e"], "label": 0}) + "\n")
    with pytest.raises(UsageError, match="line 1: an ending of 40 tokens leaves no room .* block_size 32"):
        hellaswag.encode(hellaswag.read_examples(str(long)), BLOCK, get_tokenizer())


class Server:
    """A local HTTP server for one file in a thread: the download without a network."""

    def __init__(self, root):
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_once_into_the_cache_then_reuse_it(input_file, tmp_path, monkeypatch, capsys):
    tiny_hf(tmp_path / "hf", vocab=GPT2_VOCAB)
    served = tmp_path / "www"
    served.mkdir()
    (served / "hellaswag_val.jsonl").write_bytes(open(input_file, "rb").read())
    (served / "error.html").write_text("<html>Not here</html>\n")
    server = Server(served)
    argv = [tmp_path / "hf", "--task=hellaswag", f"--data_dir={tmp_path / 'data'}", "--ledger=", "--json"]
    cache = tmp_path / "data" / "hellaswag" / "hellaswag_val.jsonl"
    try:
        for name, message in (("missing.jsonl", "HTTP Error 404"), ("error.html", "line 1 is not a JSON object")):
            monkeypatch.setattr(hellaswag, "URL", f"{server.url}/{name}")
            code, err = cli(eval_script.main, argv, capsys)
            assert code == 2 and err.count("\n") == 1 and message in err and f"{server.url}/{name}" in err, err
            assert not (tmp_path / "data").exists() or os.listdir(tmp_path / "data" / "hellaswag") == []
        monkeypatch.setattr(hellaswag, "URL", f"{server.url}/hellaswag_val.jsonl")
        code, err = cli(eval_script.main, argv, capsys)
        assert code == 0, err
    finally:
        server.close()
    assert cache.read_bytes() == open(input_file, "rb").read() and os.listdir(cache.parent) == [cache.name]
    eval_script.main([str(a) for a in argv])  # the server is gone: the cached copy is read
    row = json.loads(capsys.readouterr().out)
    direct = scored(load_model(str(tmp_path / "hf"))[0], input_file)[0]
    assert (row["input"], row["correct_norm"], row["examples"]) == (str(cache), direct.correct_norm, 6)


def test_offline_is_one_line_naming_the_url_and_input(tmp_path, monkeypatch, capsys):
    tiny_hf(tmp_path / "hf", vocab=GPT2_VOCAB)
    with socket.socket() as s:  # a port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/hellaswag_val.jsonl"
    monkeypatch.setattr(hellaswag, "URL", url)
    code, err = cli(eval_script.main, [tmp_path / "hf", "--task=hellaswag", f"--data_dir={tmp_path / 'data'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: cannot download {url} (")
    assert err.endswith("pass --input=PATH/hellaswag_val.jsonl\n") and not (tmp_path / "data").exists()


@pytest.mark.slow
def test_two_rank_torchrun_agrees_with_one_process(input_file, tmp_path, capsys):
    tiny_hf(tmp_path / "hf", vocab=GPT2_VOCAB)
    flags = [str(tmp_path / "hf"), "--task=hellaswag", f"--input={input_file}", "--device=cpu", "--json"]
    eval_script.main(flags + ["--ledger="])
    one = json.loads(capsys.readouterr().out)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "eval.py", *flags, f"--ledger={tmp_path / 'two.jsonl'}"], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)
    assert two["world_size"] == 2
    assert {k: two[k] for k in ("acc_norm", "acc", "examples")} == {k: one[k] for k in ("acc_norm", "acc", "examples")}
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 1


def replicates(root, prefix, accs, first_seed, loss=3.7, **config):
    for i, acc in enumerate(accs):
        fake_run(root, f"{prefix}-s{i}", loss + 0.001 * i, hellaswag=acc, seed=first_seed + i, **config)


@pytest.mark.parametrize("shift, verdict", [(+0.01, "better"), (-0.01, "worse"), (+0.001, "within noise")])
def test_compare_shows_accuracy_with_a_verdict_higher_is_better(tmp_path, capsys, shift, verdict):
    replicates(tmp_path, "base", [0.290, 0.291, 0.292], 42)
    replicates(tmp_path, "gc", [0.290 + shift, 0.293 + shift, 0.290 + shift], 42, grad_clip=3.5)  # paired
    compare.main([str(tmp_path / "base-*"), str(tmp_path / "gc-*")])
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:6] == ["run", "interventions", "seed", "test", "loss", "delta"] and header[6] == "hellaswag"
    assert next(line for line in out.splitlines() if line.startswith("gc-s1 ")).split()[5] == f"{0.293 + shift:.4f}"
    section = out.split("HellaSwag acc_norm (higher is better):\n")[1]
    row = next(line for line in section.splitlines() if line.startswith("gc-s0 +2"))
    assert f"{shift:+.6f}" in row and verdict in row and "paired t, 3 pairs" in row
    compare.main([str(tmp_path / "base-*"), str(tmp_path / "gc-*"), "--json"])
    acc = json.loads(capsys.readouterr().out)["hellaswag"]
    assert acc["rows"][1]["verdict"] == verdict and acc["rows"][1]["delta"] == pytest.approx(shift)


def test_compare_single_runs_use_the_baselines_accuracy_spread_and_warn_on_missing(tmp_path, capsys):
    replicates(tmp_path, "base", [0.290, 0.292, 0.294], 42)
    fake_run(tmp_path, "qkv", 3.69, hellaswag=0.330, qkv_bias=True)
    fake_run(tmp_path, "wd", 3.69, weight_decay=0.01)  # no accuracy: n/a, no verdict row
    compare.main([str(tmp_path / "base-*"), str(tmp_path / "qkv"), str(tmp_path / "wd"), "--noise_std=0.01"])
    out = capsys.readouterr().out
    section = out.split("HellaSwag acc_norm (higher is better):\n")[1]
    qkv = next(line for line in section.splitlines() if line.startswith("qkv"))
    assert "+0.038000" in qkv and "better" in qkv and "t with std of baseline (n=3)" in qkv  # not --noise_std
    assert not any(line.startswith("wd") for line in section.splitlines())
    assert "hellaswag single runs are judged with the std 0.002000 of baseline" in section
    assert next(line for line in out.splitlines() if line.startswith("wd ")).split()[5] == "n/a"
    fake_run(tmp_path, "lone", 3.7, seed=1)
    compare.main([str(tmp_path / "lone"), str(tmp_path / "qkv")])
    assert "no verdicts: the baseline has no HellaSwag accuracy" in capsys.readouterr().out
