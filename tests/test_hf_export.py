"""eval.py --export_hf writes a self-contained Hugging Face model (tokenizer, generation config, model
card); --push_to_hub uploads it (against a fake hub); lm-evaluation-harness scores the export offline
with our loglikelihoods."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as eval_script
import sample
from gpt_interventions import formats
from gpt_interventions.tokenizer import ENCODER_JSON, EOT, VOCAB_BPE, get_tokenizer
from helpers import ROOT, cli, eval_rows, make_shards, snapshot, tiny_hf, tiny_run

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TEXTS = ["Hello world", "Every effort moves you", "héllo wörld 世界 🤖\n\n  tabs\tand  spaces ,",
         "It's 2024: don't  stop .", "a<|endoftext|>b", "<|endoftext|>", " leading space"]
PROMPT = "Every effort moves you"
TOKENIZER = ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"), train=(4_000,))


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """A tiny run with GPT-2's vocabulary, scored on its test split (eval.json), and its export."""
    root = tmp_path_factory.mktemp("gpt2vocab")
    ckpt = tiny_run(data_dir, root / "run", vocab_size=50257, max_iters=3, run_name="tiny-wide", grad_clip=1.0,
                    charts=False)
    eval_script.main([ckpt, f"--data_dir={data_dir}", "--dataset=syn", "--ledger=", "--eval_tokens=512"])
    eval_script.main([ckpt, f"--export_hf={root / 'export'}"])
    return {"ckpt": ckpt, "export": str(root / "export")}


def run_offline(argv, **env):
    """Run a command in a fresh process with the hub off (and no network anyway)."""
    proc = subprocess.run([str(a) for a in argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


TRANSFORMERS_SIDE = """
import json, sys
from transformers import AutoTokenizer, pipeline
path, texts, prompt = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
tok = AutoTokenizer.from_pretrained(path)
ids = [tok(t)["input_ids"] for t in texts]
generate = pipeline("text-generation", model=path)
out = generate(prompt, max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
text = generate(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
print(json.dumps({"ids": ids, "decoded": [tok.decode(i) for i in ids], "generated": list(out), "text": text,
                  "special": [tok.bos_token_id, tok.eos_token_id, tok.model_max_length]}))
"""


def test_export_tokenizes_and_generates_as_we_do_offline(run, capsys):
    export = run["export"]
    assert sorted(os.listdir(export)) == sorted(["README.md", "config.json", "generation_config.json",
                                                 "model.safetensors", *TOKENIZER])
    for name, source in (("vocab.json", ENCODER_JSON), ("merges.txt", VOCAB_BPE)):  # the carried files as they are
        with open(os.path.join(export, name), "rb") as a, open(source, "rb") as b:
            assert a.read() == b.read()
    with open(os.path.join(export, "generation_config.json")) as f:
        assert json.load(f) == {"max_length": 32, "bos_token_id": EOT, "eos_token_id": EOT, "pad_token_id": EOT}
    proc = run_offline([sys.executable, "-c", TRANSFORMERS_SIDE, export, json.dumps(TEXTS), PROMPT])
    hf = json.loads(proc.stdout.splitlines()[-1])
    enc = get_tokenizer()
    assert hf["ids"] == [enc.encode(t, allowed_special="all") for t in TEXTS]
    assert hf["ids"][0] == [15496, 995] and hf["ids"][-2] == [EOT]  # not the empty tokenizer of before
    assert hf["decoded"] == TEXTS  # spaces and <|endoftext|> kept, as tiktoken decodes
    assert hf["special"] == [EOT, EOT, 32]
    # greedy: transformers' pipeline, our generate and sample.py --temperature=0 agree token for token
    model, _ = formats.load_model(run["ckpt"])
    prompt = enc.encode(PROMPT)
    with torch.no_grad():
        ours = model.generate(torch.tensor([prompt]), 12, temperature=0)[0].tolist()
    assert EOT not in ours[len(prompt):]  # so the pipeline, which stops there, had all 12 to generate
    assert hf["generated"] == ours and len(ours) == len(prompt) + 12
    sample.main([run["ckpt"], "--temperature=0", "--num_samples=1", "--max_new_tokens=12", "--device=cpu"])
    printed = capsys.readouterr().out
    assert printed == hf["text"] + "\n" + "-" * 40 + "\n" and hf["text"] == enc.decode(ours)


def test_model_card_reports_the_run(run):
    result, = eval_rows(os.path.dirname(run["ckpt"]))
    with open(os.path.join(run["export"], "README.md")) as f:
        card = f.read()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "# tiny-wide\n" in card and "checkpoint `ckpt.pt` at step 3" in card
    assert f"| syn/test | {result['loss']:.6f} | {result['ppl']:.2f} | {result['tokens']:,} | float32 |" in card
    assert result["step"] == 3 and result["tokens"] == 512
    assert "384 tokens in 3 optimizer steps of the `syn` dataset" in card  # 3 x 128
    flags = card.split("```\npython train.py ")[1].split("\n")[0].split()
    assert "--grad_clip=1" in flags and "--vocab_size=50257" not in flags and "--n_layer=2" in flags
    assert not any(f.startswith(("--out_dir", "--data_dir")) for f in flags)  # no paths of the machine
    assert f"pipeline(\"text-generation\", model={run['export']!r})" in card


def test_model_card_reports_hellaswag_for_this_checkpoint(data_dir, tmp_path):
    ckpt = tiny_run(data_dir, tmp_path / "run")
    at = {"checkpoint": ckpt, "task": "hellaswag", "split": "val", "dtype": "float32"}
    results = {"hellaswag/val": {**at, "step": 2, "acc_norm": 0.25, "acc": 0.5, "examples": 4},
               "old/val": {**at, "step": 1, "acc_norm": 0.75, "acc": 0.75, "examples": 4}}  # another step: left out
    with open(tmp_path / "run" / "eval.json", "w") as f:
        json.dump(results, f)
    eval_script.main([ckpt, f"--export_hf={tmp_path / 'export'}"])
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| hellaswag/val | 0.2500 | 0.5000 | 4 |" in card and "0.7500" not in card
    assert "No held-out result" not in card and "Held-out loss" not in card


def test_stale_results_and_other_vocabularies(data_dir, run, tmp_path):
    # eval.json's result is for step 1 of this run, its checkpoint is at step 2: the card leaves it out
    ckpt = tiny_run(data_dir, tmp_path / "run")  # vocab 256: not the GPT-2 BPE
    results = {"syn/test": {"checkpoint": str(tmp_path / "run" / "ckpt.pt"), "step": 1, "dataset": "syn",
                            "split": "test", "loss": 1.0, "ppl": 2.718, "tokens": 512, "dtype": "float32"}}
    with open(tmp_path / "run" / "eval.json", "w") as f:
        json.dump(results, f)
    eval_script.main([ckpt, f"--export_hf={tmp_path / 'export'}"])
    assert sorted(os.listdir(tmp_path / "export")) == ["README.md", "config.json", "generation_config.json",
                                                       "model.safetensors"]
    card = (tmp_path / "export" / "README.md").read_text()
    assert "No held-out result for this checkpoint" in card and "1.000000" not in card
    assert "No tokenizer is included: this model's vocabulary (256 ids)" in card and "pipeline_tag" not in card
    assert json.loads((tmp_path / "export" / "generation_config.json").read_text()) == {"max_length": 32}
    # a model we did not train: the card says what it is and claims nothing else
    tiny_hf(tmp_path / "hf", vocab=50257)
    eval_script.main([str(tmp_path / "hf"), f"--export_hf={tmp_path / 'hf_export'}"])
    card = (tmp_path / "hf_export" / "README.md").read_text()
    assert "# hf\n" in card and "a GPT-2 model in the Hugging Face format" in card and "did not train it" in card
    assert "## Training" not in card and "## Evaluation" not in card
    assert set(TOKENIZER) <= set(os.listdir(tmp_path / "hf_export"))


# ----------------------------------------------------------------------------------------------
# --push_to_hub against a fake of huggingface_hub's HfApi


class FakeHub:
    """HfApi's create_repo, model_info and upload_folder: repos in memory, uploads as bytes."""

    def __init__(self, existing=None, fail=None):
        self.repos = dict(existing or {})  # repo id -> private
        self.uploads, self.fail, self.folders = {}, fail, []

    def api(self, token=None):
        hub = self
        assert token == "hf_test_token"

        class Api:
            def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
                if hub.fail:
                    raise hub.fail
                assert exist_ok and repo_type == "model"
                hub.repos.setdefault(repo_id, private)
                return f"https://huggingface.co/{repo_id}"

            def model_info(self, repo_id):
                return type("Info", (), {"private": hub.repos[repo_id]})()

            def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
                hub.folders.append(folder_path)
                hub.uploads[repo_id] = snapshot(folder_path)
        return Api()


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    fake = FakeHub(existing={"me/was-public": False})
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    return fake


def test_push_uploads_the_export_privately(run, hub, tmp_path, capsys):
    code, _ = cli(eval_script.main, [run["ckpt"], "--push_to_hub=me/tiny", f"--export_hf={tmp_path / 'kept'}"], capsys)
    assert code == 0 and hub.repos == {"me/was-public": False, "me/tiny": True}
    assert hub.uploads["me/tiny"] == snapshot(tmp_path / "kept")  # every file, byte for byte
    assert "model='me/tiny'" in (tmp_path / "kept" / "README.md").read_text()  # the card names the repo
    # without --export_hf: a temporary export, the same files, removed afterwards; --public makes it public
    code, _ = cli(eval_script.main, [run["ckpt"], "--push_to_hub=me/tiny2", "--public=True"], capsys)
    assert code == 0 and hub.repos["me/tiny2"] is False and not os.path.exists(hub.folders[-1])
    readme = hub.uploads["me/tiny2"].pop("README.md")
    assert readme == hub.uploads["me/tiny"].pop("README.md").replace(b"me/tiny", b"me/tiny2")
    assert hub.uploads["me/tiny2"] == hub.uploads["me/tiny"]
    assert not any(b"hf_test_token" in data for data in hub.uploads["me/tiny"].values())
    code, err = cli(eval_script.main, [run["ckpt"], "--push_to_hub=me/was-public"], capsys)
    assert code == 2 and "me/was-public exists on the hub and is public; pass --public=True" in err
    assert "me/was-public" not in hub.uploads


def _http_error(status):
    from huggingface_hub.utils import HfHubHTTPError
    response = type("Response", (), {"status_code": status, "headers": {}, "url": "", "request": None})()
    return HfHubHTTPError(f"{status} Client Error", response=response)


@pytest.mark.parametrize("fail,message", [
    (ConnectionError("Max retries exceeded\nwith url"), "cannot reach the Hugging Face hub to upload me/tiny"),
    ("httpx", "cannot reach the Hugging Face hub to upload me/tiny (Name or service not known)"),
    (401, "the token was refused; run `hf auth login` or set HF_TOKEN"),
    (403, "this token may not write there"),
])
def test_failed_push_is_one_line_and_keeps_the_export(run, hub, tmp_path, capsys, fail, message):
    import httpx
    hub.fail = (httpx.ConnectError("Name or service not known") if fail == "httpx" else
                _http_error(fail) if isinstance(fail, int) else fail)
    code, err = cli(eval_script.main, [run["ckpt"], "--push_to_hub=me/tiny", f"--export_hf={tmp_path / 'x'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert f"{tmp_path / 'x'} is kept: `hf upload me/tiny {tmp_path / 'x'}`" in err
    assert snapshot(tmp_path / "x") == snapshot(run["export"]) | {"README.md": snapshot(tmp_path / "x")["README.md"]}


@pytest.mark.parametrize("setup,argv,message", [
    ("offline", ["--push_to_hub=me/tiny"], "HF_HUB_OFFLINE is set"),
    ("no token", ["--push_to_hub=me/tiny"], "needs a Hugging Face token with write access: set HF_TOKEN"),
    ("", ["--push_to_hub=not a repo"], "'not a repo' is not a Hugging Face repo id"),
    ("", ["--push_to_hub=tiny"], "'tiny' is not a Hugging Face repo id; use OWNER/NAME"),
    ("", ["--public=True"], "--public applies to --push_to_hub only"),
    ("", ["--push_to_hub=me/tiny", "--export_book=bk"], "one format per call"),
])
def test_push_refused_before_any_work(run, hub, tmp_path, monkeypatch, capsys, setup, argv, message):
    import huggingface_hub
    if setup == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if setup == "no token":
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(formats, "_from_checkpoint", lambda *a: pytest.fail("loaded the model"))
    monkeypatch.chdir(tmp_path)
    code, err = cli(eval_script.main, [run["ckpt"], *argv, "--export_hf=x"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert os.listdir(tmp_path) == [] and hub.uploads == {}


# ----------------------------------------------------------------------------------------------
# lm-evaluation-harness, offline, on a local task


TASK = """task: tiny_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
DOCS = [{"context": "Every effort moves you", "continuation": " forward, always."},
        {"context": "héllo 世界", "continuation": " 🤖 done<|endoftext|>"},
        {"context": "The", "continuation": " capital of France is Paris"}]


def ours(model, context, continuation):
    """(sum of log-probabilities of the continuation's tokens given the context, all of them greedy),
    with the continuation's tokens as the harness splits them: the whole text's, after the context's."""
    enc = get_tokenizer()
    ctx = enc.encode(context, allowed_special="all")
    whole = enc.encode(context + continuation, allowed_special="all")
    assert whole[:len(ctx)] == ctx
    x = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logits, _ = model(x)
    logp = torch.log_softmax(logits[0, len(ctx) - 1:].double(), dim=-1)
    target = torch.tensor(whole[len(ctx):])
    return logp[torch.arange(len(target)), target].sum().item(), bool((logp.argmax(-1) == target).all())


def test_lm_eval_scores_the_export_with_our_loglikelihoods(run, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(data=data))
    # README's command but for the paths; HF_HOME keeps the datasets cache in tmp_path
    lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    run_offline([lm_eval, "--model", "hf", "--model_args", f"pretrained={run['export']},dtype=float32",
                "--include_path", tmp_path / "tasks", "--tasks", "tiny_loglikelihood", "--device", "cpu",
                "--batch_size", "2", "--log_samples", "--output_path", tmp_path / "out"], HF_HOME=tmp_path / "hf")
    [path] = glob.glob(str(tmp_path / "out" / "*" / "samples_tiny_loglikelihood_*.jsonl"))
    with open(path) as f:
        samples = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    model, _ = formats.load_model(run["ckpt"])
    assert [s["doc"] for s in samples] == DOCS
    for s in samples:
        [[ll, greedy]] = s["filtered_resps"]
        expected, expected_greedy = ours(model, s["doc"]["context"], s["doc"]["continuation"])
        assert float(ll) == pytest.approx(expected, rel=1e-6, abs=1e-5) and expected < -20
        assert greedy == str(expected_greedy)
