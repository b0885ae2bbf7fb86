"""Held-out loss: the exact token-weighted mean over fixed, non-overlapping windows of a split.

    python eval.py MODEL [--dataset=NAME] [--split=test] [--eval_tokens=N] [--json] ...
    python eval.py MODEL --export_hf=DIR      (or --export_book=DIR)
    python eval.py MODEL --task=hellaswag [--input=hellaswag_val.jsonl]
    python eval.py MODEL --push_to_hub=OWNER/NAME [--export_hf=DIR] [--public=True]
    torchrun --standalone --nproc_per_node=8 eval.py MODEL

MODEL is a checkpoint, a run directory, a Hugging Face GPT-2 directory or hub id, or a model in the
book's format (gpt_interventions/formats.py), so our runs, the original GPT-2 weights and the
story's own models are scored by the same code on the same tokens. One of our checkpoints is scored
on the dataset it was trained on, any other model on the story's, unless --dataset says otherwise;
a local MODEL is read before the data, so a wrong path is named as such.
`evaluation.evaluate` is the one function that scores a model; train.py's validation calls it too.
--task=hellaswag scores HellaSwag's validation accuracy instead (gpt_interventions/hellaswag.py).
"""

import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

from gpt_interventions import eval_results, hellaswag
from gpt_interventions.cli import field, parse_config
from gpt_interventions.device import print0, set_tf32, setup_dist, teardown_dist
from gpt_interventions.errors import UsageError, run_main
from gpt_interventions.evaluation import evaluate
from gpt_interventions.formats import check_new_dir, export_book, export_hf, is_download, load_model
from gpt_interventions.loader import eval_windows
from gpt_interventions.provenance import git_commit
from gpt_interventions.publish import check_push, push_to_hub
from gpt_interventions.shards import find_shards
from gpt_interventions.tokenizer import get_tokenizer

STORY = "story"  # the story's dataset: where GPT-2 and the book's models are scored by default
USAGE = "MODEL [--key=value ...]   (MODEL: ckpt.pt, run directory, Hugging Face or book directory, or hub id)"


@dataclass
class EvalConfig:
    dataset: str = field("", "dataset directory under data_dir (made by prepare_data.py); empty: the one a "
                         "checkpoint of ours was trained on, else story (GPT-2, the book's and the story's "
                         "models). A local MODEL is read first, so a wrong path is named as such")
    data_dir: str = field("data", "root of the prepared datasets")
    split: str = field("test", "which split to score", choices=("train", "val", "test"))
    eval_tokens: int = field(0, "token budget: the first eval_tokens // block_size windows; 0: the whole split")
    block_size: int = field(0, "tokens per window; 0: the model's own block_size. A long-context model scored "
                            "with --block_size=1024 is comparable with the 1,024-token runs (each token sees the "
                            "same context); at its own length its tokens see more context and score lower")
    batch_size: int = field(8, "sequences per forward pass (speed only: the windows are fixed)")
    dtype: str = field("float32", "autocast dtype; float32 (no TF32) gives the reference numbers",
                       choices=("float32", "bfloat16", "float16"))
    device: str = field("auto", "auto, cpu, cuda or cuda:N")
    json: bool = field(False, "print the result as one JSON object instead of a line")
    ledger: str = field("results.jsonl", "results ledger that gets one row per evaluation; empty: none")
    export_hf: str = field("", "write MODEL to this new directory in the Hugging Face GPT-2 format (weights, "
                           "tokenizer, generation config, model card), then exit")
    export_book: str = field("", "write MODEL to this new directory in the book's format (model.json, "
                             "model.safetensors), which the book's and the story's code load, then exit")
    task: str = field("loss", "loss: the held-out loss of --dataset/--split; hellaswag: HellaSwag validation "
                      "accuracy (acc_norm and acc)", choices=("loss", "hellaswag"))
    input: str = field("", "--task=hellaswag: a local copy of hellaswag_val.jsonl; empty: download it once "
                       "into data_dir/hellaswag/")
    push_to_hub: str = field("", "upload MODEL's Hugging Face export (--export_hf, else a temporary directory) "
                             "to this hub repo id, then exit; the token is HF_TOKEN or `hf auth login`'s")
    public: bool = field(False, "with --push_to_hub: create the repo public (default: private)")


def main(argv):
    (ec,), positionals, _ = parse_config(argv, [EvalConfig], "eval.py", USAGE, max_positionals=1)
    if not positionals:
        raise UsageError(f"which model? usage: eval.py {USAGE}")
    if ec.eval_tokens < 0 or ec.batch_size <= 0:
        raise UsageError("--eval_tokens must be >= 0 and --batch_size positive")
    if ec.block_size < 0:
        raise UsageError(f"--block_size must be >= 0 (0: the model's own), got {ec.block_size}")
    spec = positionals[0]
    if ec.export_hf or ec.export_book or ec.push_to_hub or ec.public:
        return export(spec, ec)
    if ec.task == "hellaswag":
        return score_hellaswag(spec, ec)
    if ec.input:
        raise UsageError("--input is the HellaSwag file of --task=hellaswag")
    d = setup_dist(ec.device)
    download = is_download(spec)
    if not download:  # a local model first: a wrong path is named as such, and it names its dataset
        model, info = load_model(spec, d.device)
    else:
        info = {}
    ec.dataset = ec.dataset or trained_on(info) or STORY
    shards = find_shards(ec.data_dir, ec.dataset, ec.split)  # before a model download: fail fast
    if download:
        model, info = load_model(spec, d.device)
    window = ec.block_size or model.config.block_size
    if window > model.config.block_size:
        raise UsageError(f"--block_size={window} is longer than the model's block_size {model.config.block_size}: "
                         "it has no positions past that; give --block_size up to it, or 0 for its own")
    windows = eval_windows(shards, window, ec.eval_tokens)
    set_tf32(False)  # float32 means float32: TF32 matmuls would move the sixth decimal
    t0 = time.time()
    loss, tokens = evaluate(model, windows, ec.batch_size, d.device, ec.dtype, d.rank, d.world_size, window)
    seconds = time.time() - t0
    shorter = window != model.config.block_size  # --block_size: not the model's own windows
    row = {**info, "dataset": ec.dataset, "split": ec.split, "eval_tokens": ec.eval_tokens,
           **({"window": window} if shorter else {}), "dtype": ec.dtype, "loss": loss, "ppl": math.exp(loss),
           "tokens": tokens, "seconds": round(seconds, 3), "batch_size": ec.batch_size, "device": d.device,
           "world_size": d.world_size, **stamp()}
    if d.master:
        record(row, ec.ledger)
    print0(json.dumps(row) if ec.json else
           f"{ec.dataset}/{ec.split} loss {loss:.6f} ppl {row['ppl']:.2f} tokens {tokens:,}"
           f"{f' in {window}-token windows' if shorter else ''} model {info['model']} ({duration(seconds)})")
    teardown_dist()


def trained_on(info):
    """The dataset one of our checkpoints was trained on; None for other models."""
    if info.get("source") != "checkpoint":
        return None
    return ((info.get("config") or {}).get("train") or {}).get("dataset") or None


def score_hellaswag(spec, ec):
    """eval.py MODEL --task=hellaswag: the same model loading, ledger and eval.json as the loss."""
    examples = hellaswag.read_examples(ec.input) if ec.input else None  # a bad file fails before any load
    d = setup_dist(ec.device)
    model, info = load_model(spec, d.device)
    hellaswag.check_vocab(model)  # before a download: a model that cannot read the file costs nothing
    path = ec.input or hellaswag.local_copy(os.path.join(ec.data_dir, "hellaswag"))  # every rank: atomic
    examples = examples or hellaswag.read_examples(path)
    encoded, cut = hellaswag.encode(examples, model.config.block_size, get_tokenizer())
    set_tf32(False)
    t0 = time.time()
    s = hellaswag.score(model, encoded, d.device, ec.dtype, d.rank, d.world_size)
    seconds = time.time() - t0
    row = {**info, "task": "hellaswag", "split": "val", "input": path, "dtype": ec.dtype, "acc_norm": s.acc_norm,
           "acc": s.acc, "examples": s.examples, "correct_norm": s.correct_norm, "correct": s.correct,
           "truncated": cut, "seconds": round(seconds, 3), "device": d.device, "world_size": d.world_size,
           **stamp()}
    if d.master:
        record(row, ec.ledger)
    cut_note = f"; {cut} contexts cut from the left to fit block_size {model.config.block_size}" if cut else ""
    print0(json.dumps(row) if ec.json else
           f"hellaswag/val acc_norm {s.acc_norm:.4f} acc {s.acc:.4f} examples {s.examples:,} "
           f"model {info['model']} ({duration(seconds)}{cut_note})")
    teardown_dist()


def export(spec, ec):
    """--export_hf, --export_book, --push_to_hub: MODEL in another format, or uploaded; nothing scored."""
    if ec.export_book and (ec.export_hf or ec.push_to_hub):
        raise UsageError("--export_book with --export_hf or --push_to_hub: one format per call "
                         "(the hub gets the Hugging Face export)")
    if ec.public and not ec.push_to_hub:
        raise UsageError("--public applies to --push_to_hub only")
    out = ec.export_hf or ec.export_book
    if out:
        check_new_dir(out)  # before loading: a refusal costs nothing
    token = check_push(ec.push_to_hub) if ec.push_to_hub else None
    model, info = load_model(spec)
    if ec.export_book:
        export_book(model, out)
        print(f"wrote {out}: the book's GPTModel(json.load(model.json)) loads model.safetensors")
        return
    with nullcontext(out) if out else tempfile.TemporaryDirectory(prefix="export_hf_") as folder:
        export_hf(model, folder, info, where=ec.push_to_hub or None)
        if out:
            print(f"wrote {out}: a Hugging Face GPT-2 model; its README.md says how to load it")
        if ec.push_to_hub:
            url, private = push_to_hub(folder, ec.push_to_hub, not ec.public, token, kept=bool(out))
            print(f"uploaded to {url} ({'private' if private else 'public'})")


def stamp():
    """What produced a result row, and when: the code's commit and the UTC time."""
    return {"git_commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def record(row, ledger):
    """Append to the ledger; for one of our runs also keep the result in its eval.json, one row
    per checkpoint and evaluation settings (gpt_interventions/eval_results.py)."""
    if ledger:
        with open(ledger, "a") as f:
            f.write(json.dumps(row) + "\n")
    run_dir = os.path.dirname(row["checkpoint"]) if row["source"] == "checkpoint" else None
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, "config.json")):  # train.py wrote it
        eval_results.record(run_dir, row)


def duration(seconds):
    """2m13s style."""
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


if __name__ == "__main__":
    run_main(main)
