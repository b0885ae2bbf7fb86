"""Tokenize a corpus into checked token shards: data/NAME/{train,val,test}_NNNNNN.bin + meta.json.

    python prepare_data.py --dataset=sample                          # the embedded C4 sample
    python prepare_data.py --dataset=fineweb --max_tokens=3.26e9     # FineWeb sample-10BT (hub)
    python prepare_data.py --dataset=mine --input='corpus/*.jsonl.gz'
    python prepare_data.py --dataset=story [--input=DIR]           # the story's own tokens (hub)

Stage 1 tokenizes each source file (read by gpt_interventions/sources.py), in order, with a process pool into a
cache file of its documents' tokens and split keys (data/NAME/.cache/); a finished file's cache is reused, so an
interrupted run resumes where it stopped. A cache is keyed by all that shapes it (the file's content or hub
commit, the text and id fields, the tokenizer) and holds nothing a split flag decides, so a rerun with other
flags reuses it correctly. Stage 2 assembles the caches into shards in a staging folder and moves them into
place, meta.json last, so no half-prepared split looks complete.

Splits (gpt_interventions/splits.py): a hash of each document's identity decides whether it is held
out; the test split depends on the files, holdout_frac and test_tokens only. fineweb and
fineweb-edu take the hub's holdout and budgets whether their parquet files come from the hub or
from --input, so a local copy of the files gives the hub route's splits.
"""

import glob
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np

from gpt_interventions import ROOT
from gpt_interventions.atomic import atomic_write, write_json
from gpt_interventions.cli import field, parse_config
from gpt_interventions.errors import UsageError, run_main
from gpt_interventions import story_data
from gpt_interventions.shards import HEADER_BYTES, MAGIC, MAX_SHARD_TOKENS, VERSION, ShardWriter, sha256_file
from gpt_interventions.sources import hub_call, hub_download, hub_listing, hub_revision, local_files, read_documents
from gpt_interventions.splits import Prefixes, held_out_docs, held_out_splits, split_key
from gpt_interventions.tokenizer import EOT, get_tokenizer

USAGE = "--dataset=NAME [--input=PATH_OR_GLOB] [--key=value ...]"
SAMPLE = os.path.join(ROOT, "assets", "corpus", "c4-sample-1000.jsonl.gz")
# hub datasets: (repository, folder of the subset's parquet files)
HUB = {"fineweb": "HuggingFaceFW/fineweb", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
KNOWN = ["sample", *HUB, "story"]
# a hub dataset's splits, from the hub or a local copy of its files (--input)
HUB_BUDGETS = {"val_tokens": 10 * 2**20, "test_tokens": 20 * 2**20}  # fixed, about 1.5% of a file
HOLDOUT = {"hub": 0.05, "local": 0.1}
BUDGET_RULE = {"test": "key order, from the first pool_files.test files, up to test_tokens",
               "val": "the others in key order, from the first pool_files.val files, up to val_tokens"}
PROPORTIONAL_RULE = {"test": "key < holdout_frac / 2, every file", "val": "the other held-out documents"}
# what shapes a cached file besides its identity and fields: bump when tokens or keys change
CACHE_RULE = "v2: EOT + encode_ordinary(text) per document; key sha256('id:'+id or 'text:'+text)[:8]"


@dataclass
class PrepConfig:
    dataset: str = field("", f"name of data/NAME; without --input one of {', '.join(KNOWN)}")
    input: str = field("", "local .parquet, .jsonl, .jsonl.gz or .txt files (path or glob); story: the "
                       "directory of its train.safetensors and validation.safetensors")
    text_field: str = field("text", "the text column of parquet and jsonl inputs")
    id_field: str = field("id", "document identity column; documents without it are keyed by text")
    subset: str = field("sample/10BT", "folder of the hub dataset's parquet files")
    revision: str = field("main", "hub revision; the resolved commit is recorded and reused")
    data_dir: str = field("data", "root of the prepared datasets")
    max_tokens: int = field(0, "cap on the training split in tokens; 0: the whole corpus")
    val_tokens: int = field(0, "val split budget; 0: 10Mi tokens (hub, story) or half the held-out docs (local)")
    test_tokens: int = field(0, "test split budget; 0: 20Mi tokens (hub), 19,660,801 (story) or half the "
                             "held-out docs (local)")
    test_offset: int = field(0, "story: where its test split starts in the validation tokens; 0: 50,000,000")
    holdout_frac: float = field(0.0, "fraction of documents held out of training; 0: 0.05 (hub), 0.1 (local)")
    shard_tokens: int = field(100_000_000, "tokens per shard file")
    num_proc: int = field(0, "tokenizer processes; 0: all cores")
    overwrite: bool = field(False, "replace a dataset prepared with other settings")


# ----------------------------------------------------------------------------------------------
# tokenization (runs in the worker processes)

_enc = None


def _init_worker():
    global _enc
    _enc = get_tokenizer()


def encode_batch(docs):
    """[(id or None, text)] -> (uint16 tokens with EOT before each document, lengths, keys)."""
    if _enc is None:
        _init_worker()
    flat, lens, keys = [], [], []
    for doc_id, text in docs:
        toks = _enc.encode_ordinary(text)
        flat.append(EOT)
        flat.extend(toks)
        lens.append(len(toks) + 1)
        keys.append(split_key(doc_id, text))
    tokens = np.array(flat, dtype=np.uint16)
    return tokens, np.array(lens, dtype=np.int64), np.array(keys, dtype=np.uint64)


# ----------------------------------------------------------------------------------------------
# stage 1: one source file -> cache of its tokens, document lengths and split keys


def cache_paths(cache_dir, ident):
    stem = os.path.join(cache_dir, hashlib.sha256(ident.encode()).hexdigest()[:24])
    return stem + ".tokens", stem + ".index.npz", stem + ".json"


def tokenize_file(path, ident, cfg, cache_dir, pool):
    """Tokenize one file into its cache (reused when already complete); returns its summary, which
    like the cache depends on nothing but the file and `ident`."""
    tok_path, idx_path, sum_path = cache_paths(cache_dir, ident)
    if os.path.exists(sum_path):
        with open(sum_path) as f:
            return json.load(f)
    from tqdm import tqdm
    lens, keys, n_tokens, t0 = [], [], 0, time.time()
    bar = tqdm(desc=f"tokenizing {os.path.basename(path)}", unit=" docs", disable=None)
    with open(tok_path + ".tmp", "wb") as out:
        batches = read_documents(path, cfg.text_field, cfg.id_field)
        results = pool.imap(encode_batch, batches) if pool else map(encode_batch, batches)
        for tokens, l, k in results:  # imap keeps the file's order: identical bytes on every run
            out.write(tokens.tobytes())
            lens.append(l)
            keys.append(k)
            n_tokens += tokens.size
            bar.update(l.size)
            bar.set_postfix(tokens=f"{n_tokens:,}", tok_per_s=f"{n_tokens / (time.time() - t0):,.0f}")
    bar.close()
    lens = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    atomic_write(idx_path, lambda f: np.savez(f, lens=lens, keys=keys))
    os.replace(tok_path + ".tmp", tok_path)
    summary = {"file": ident, "docs": int(lens.size), "tokens": n_tokens}
    write_json(sum_path, summary)  # written last: its presence marks a complete cache
    print(f"tokenized {os.path.basename(path)}: {summary['docs']:,} docs, {n_tokens:,} tokens "
          f"({n_tokens / max(time.time() - t0, 1e-9):,.0f} tokens/s)", flush=True)
    return summary


# ----------------------------------------------------------------------------------------------
# stage 2: caches -> shards


def assemble(files, cache_dir, staging, cfg, holdout, budgets, pool_files):
    """Write the train, test and val shards into `staging`; returns per-split summaries.
    pool_files: {split: the number of files, from the first, its documents are drawn from}."""
    train = ShardWriter(staging, "train", cfg.shard_tokens)
    remaining = cfg.max_tokens or float("inf")
    pool = []  # (key, file index, start, length) of held-out documents in the pool files
    for i, ident in enumerate(files):
        tok_path, idx_path, _ = cache_paths(cache_dir, ident)
        tokens = np.memmap(tok_path, dtype=np.uint16, mode="r") if os.path.getsize(tok_path) else np.zeros(0, np.uint16)
        with np.load(idx_path) as idx:
            lens, keys = idx["lens"], idx["keys"]
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        held = keys < holdout
        for lo in range(0, lens.size, 100_000):  # bounded memory: a slice of documents at a time
            hi = min(lo + 100_000, lens.size)
            if remaining <= 0:
                break
            span = tokens[starts[lo]:starts[hi - 1] + lens[hi - 1]] if hi > lo else tokens[:0]
            mask = np.repeat(~held[lo:hi], lens[lo:hi])
            chosen = np.asarray(span[mask])[: int(min(remaining, 2**62))]
            train.add(chosen)
            remaining -= chosen.size
        if i < pool_files["val"]:  # val's prefix holds test's
            pool += [(int(keys[j]), i, int(starts[j]), int(lens[j])) for j in np.flatnonzero(held)]
        del tokens
    out = {"train": train.close()}
    for split, docs in held_out_splits(pool, budgets, holdout, pool_files["test"]).items():
        writer = ShardWriter(staging, split, cfg.shard_tokens)
        for i, start, length in docs:
            tok_path = cache_paths(cache_dir, files[i])[0]
            writer.add(np.fromfile(tok_path, dtype=np.uint16, count=length, offset=2 * start))
        out[split] = writer.close()
    return out


# ----------------------------------------------------------------------------------------------
# main


def check_config(cfg):
    if not cfg.dataset:
        raise UsageError(f"--dataset is required: one of {', '.join(KNOWN)}, or any name with --input=PATH")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.dataset):
        raise UsageError(f"--dataset={cfg.dataset!r} is not a plain name (letters, digits, . _ -)")
    if not cfg.input and cfg.dataset not in KNOWN:
        raise UsageError(f"unknown dataset {cfg.dataset!r}: known are {', '.join(KNOWN)}; "
                         "for a local corpus add --input=PATH_OR_GLOB")
    for name in ("max_tokens", "val_tokens", "test_tokens", "test_offset", "num_proc"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must be 0 or positive, got {getattr(cfg, name)}")
    if cfg.shard_tokens <= 0:
        raise UsageError(f"--shard_tokens must be positive, got {cfg.shard_tokens}")
    if cfg.shard_tokens > MAX_SHARD_TOKENS:  # else it overflows the header after buffering gigabytes
        raise UsageError(f"--shard_tokens must be at most {MAX_SHARD_TOKENS:,} (the shard header's int32 "
                         f"token count), got {cfg.shard_tokens:,}")
    if not 0 <= cfg.holdout_frac < 1:
        raise UsageError(f"--holdout_frac must be in [0, 1), got {cfg.holdout_frac}")
    if 0 < cfg.holdout_frac * 2**64 < 1:
        raise UsageError(f"--holdout_frac={cfg.holdout_frac} holds out no document (split keys are "
                         "multiples of 2^-64); use a larger fraction")
    if cfg.dataset == "story":
        if cfg.input and not os.path.isdir(cfg.input):
            raise UsageError(f"--input={cfg.input} is not a directory; for --dataset=story give the directory "
                             f"of {' and '.join(story_data.FILES.values())}")
        return
    if cfg.test_offset:
        raise UsageError("--test_offset is for --dataset=story only")
    if cfg.dataset not in HUB and (cfg.val_tokens == 0) != (cfg.test_tokens == 0):
        raise UsageError("for a local corpus set both --val_tokens and --test_tokens, or neither")


def settings(cfg):
    """The config fields that decide the output bytes (num_proc and overwrite do not, nor, for the
    story's tokens, the text corpus's fields)."""
    ignored = {"num_proc", "overwrite", "data_dir"}
    if cfg.dataset == "story":
        ignored |= {"text_field", "id_field", "subset", "holdout_frac"}
    return {k: v for k, v in asdict(cfg).items() if k not in ignored}


def local_inputs(cfg):
    """[(path, identity)] of a local corpus's files, the identity its name and content (so an edited
    or added file is seen); None for the hub and the story."""
    if cfg.dataset == "story" or (not cfg.input and cfg.dataset in HUB):
        return None
    paths = [SAMPLE] if not cfg.input else local_files(cfg.input)
    return [(p, f"{os.path.basename(p)}@{sha256_file(p)}") for p in paths]


def main(argv):
    (cfg,), _, _ = parse_config(argv, [PrepConfig], "prepare_data.py", USAGE)
    check_config(cfg)
    out_dir = os.path.join(cfg.data_dir, cfg.dataset)
    meta_path = os.path.join(out_dir, "meta.json")
    old, inputs = None, local_inputs(cfg)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        old_settings = old.get("settings", {})
        old_inputs = old.get("source", {}).get("inputs")
        same_inputs = inputs is None or old_inputs == [ident for _, ident in inputs]
        if old_settings == settings(cfg) and same_inputs:
            print(f"{out_dir} is already prepared with these settings (meta.json); nothing to do")
            return
        if not cfg.overwrite and old_settings != settings(cfg):
            changed = [f"{k}: {old_settings.get(k)!r} -> {v!r}" for k, v in settings(cfg).items()
                       if old_settings.get(k) != v]
            raise UsageError(f"{out_dir} was prepared with other settings ({'; '.join(changed)}); "
                             "use another --dataset name, or --overwrite to replace it")
        if not cfg.overwrite:  # the same settings, but the files they read changed (or were not recorded)
            gone = sorted(set(old_inputs or []) - {ident for _, ident in inputs})
            then = f"{len(old_inputs)} files then" if old_inputs is not None else "files not recorded then"
            raise UsageError(f"{out_dir} was prepared from other input files ({then}, {len(inputs)} now"
                             + (f"; {gone[0]} is gone or changed" if gone else "") +
                             "); use another --dataset name, or --overwrite to replace it")
    if cfg.dataset == "story":
        meta = prepare_story(cfg, out_dir, old)
    else:
        meta = prepare_corpus(cfg, out_dir, old, inputs)
    splits = meta["splits"]
    print(f"prepared {out_dir}: " + ", ".join(
        f"{s} {v['documents']:,} docs {v['tokens']:,} tokens in {len(v['shards'])} shard(s)" for s, v in splits.items()))


def prepare_corpus(cfg, out_dir, old, inputs):
    """Tokenize a text corpus (the sample, a hub dataset or local files) into split shards."""
    hub_splits = cfg.dataset in HUB  # from the hub or a local copy of its files: the hub's splits
    holdout_frac = cfg.holdout_frac or HOLDOUT["hub" if hub_splits else "local"]
    holdout = np.uint64(int(holdout_frac * 2**64))
    if hub_splits:
        budgets = {k.split("_")[0]: getattr(cfg, k) or HUB_BUDGETS[k] for k in HUB_BUDGETS}
    else:
        budgets = {"val": cfg.val_tokens, "test": cfg.test_tokens}  # 0: proportional, decided below
    if inputs is None:
        repo = HUB[cfg.dataset]
        sha, names = hub_listing(repo, cfg.subset, pinned(cfg, old))
        source = {"kind": "hub", "repo": repo, "subset": cfg.subset, "revision": cfg.revision, "revision_sha": sha}
        fetch = lambda name: hub_download(repo, name, sha)
        idents = [f"{repo}@{sha}/{n}" for n in names]
    else:
        names, idents = [p for p, _ in inputs], [ident for _, ident in inputs]
        source = {"kind": "local", "input": cfg.input or os.path.relpath(SAMPLE, ROOT), "inputs": idents}
        fetch = lambda path: path
    import tiktoken
    # a cache is keyed by all that shapes it: the file (its content, or the hub commit), its fields, the tokenizer
    keyed = [f"{i}|{cfg.text_field}|{cfg.id_field}|tiktoken {tiktoken.__version__}|{CACHE_RULE}" for i in idents]

    cache_dir = os.path.join(out_dir, ".cache")
    os.makedirs(cache_dir, exist_ok=True)
    num_proc = cfg.num_proc or os.cpu_count() or 1
    proportional = budgets["val"] == 0
    summaries, train_tokens, prefixes = [], 0, Prefixes(budgets, holdout)
    pool = multiprocessing.Pool(num_proc, initializer=_init_worker) if num_proc > 1 else None
    try:
        for i, (name, ident) in enumerate(zip(names, keyed)):
            enough_train = cfg.max_tokens and train_tokens >= cfg.max_tokens
            if enough_train and prefixes.done:
                break
            summary = tokenize_file(fetch(name), ident, cfg, cache_dir, pool)
            with np.load(cache_paths(cache_dir, ident)[1]) as idx:
                file_train, file_held = held_out_docs(idx["lens"], idx["keys"], i, holdout)
            summaries.append({**summary, "file": os.path.basename(name), "train_tokens": file_train,
                              "heldout_tokens": summary["tokens"] - file_train})
            train_tokens += file_train
            if not proportional:
                prefixes.add(file_held, i + 1)
    finally:
        if pool:
            pool.close()
            pool.join()
    if sum(s["tokens"] for s in summaries) == 0:
        raise UsageError(f"the corpus {source.get('input') or source.get('repo')} holds no documents")
    pool_files = prefixes.files  # {split: the shortest prefix of the files that holds its documents}
    if proportional:
        pool_files, budgets = {"test": len(summaries), "val": len(summaries)}, None
    if len(pool_files) < 2:
        held, want = prefixes.held_tokens, budgets["val"] + budgets["test"]
        short = "fewer than" if held < want else "too few, test's last document being cut, for"
        raise UsageError(f"the corpus holds {held:,} held-out tokens (holdout_frac {holdout_frac}), {short} "
                         f"val_tokens + test_tokens = {want:,}; lower them, raise --holdout_frac, or add documents")

    staging = new_staging(out_dir)
    splits = assemble(keyed[:len(summaries)], cache_dir, staging, cfg, holdout, budgets, pool_files)
    meta = install(out_dir, staging, cfg, source, splits, {
        "files": summaries, "pool_files": pool_files,
        "tokenizer": {"name": "gpt2", "library": f"tiktoken {tiktoken.__version__}", "eot": EOT,
                      "document_prefix": "eot", "method": "encode_ordinary"},
        "split_rule": {"key": "sha256('id:'+id or 'text:'+text)[:8] / 2**64", "holdout_frac": holdout_frac,
                       **(PROPORTIONAL_RULE if budgets is None else BUDGET_RULE)}})
    shutil.rmtree(cache_dir, ignore_errors=True)
    return meta


def prepare_story(cfg, out_dir, old):
    """Import the story's token dataset (gpt_interventions/story_data.py), from a local copy of its
    two files (--input=DIR) or the hub, checked before anything is written."""
    repo = story_data.REPO
    if cfg.input:
        paths = {split: os.path.join(cfg.input, name) for split, name in story_data.FILES.items()}
        source = {"kind": "local", "input": cfg.input}
    else:
        hint = f"download {' and '.join(story_data.FILES.values())} of {repo} and use --input=DIR"
        sha = hub_revision(repo, pinned(cfg, old), hint)
        paths = {split: hub_call(repo, f"download {name} of", lambda name=name: hub_download(repo, name, sha), hint)
                 for split, name in story_data.FILES.items()}
        source = {"kind": "hub", "repo": repo, "revision": cfg.revision, "revision_sha": sha}
    files = {split: story_data.TokenFile(path) for split, path in paths.items()}
    story_data.check(files, cfg)
    staging = new_staging(out_dir)
    splits = story_data.write_splits(files, cfg, staging)
    return install(out_dir, staging, cfg, source, splits, {
        "files": [{"file": os.path.basename(f.path), "tokens": f.size} for f in files.values()],
        "tokenizer": {"name": "gpt2", "eot": EOT, "document_suffix": "eot", "by": repo},
        "split_rule": story_data.split_rule(files, cfg)})


def pinned(cfg, old):
    """The hub revision to read: the commit resolved at the first preparation, unless one is asked for."""
    if cfg.revision == "main" and old and old.get("source", {}).get("revision_sha"):
        return old["source"]["revision_sha"]
    return cfg.revision


def new_staging(out_dir):
    staging = os.path.join(out_dir, ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def install(out_dir, staging, cfg, source, splits, details):
    """Swap the staged shards in for any old ones; meta.json is written last and marks a complete dataset."""
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for old_shard in glob.glob(os.path.join(out_dir, "*_[0-9]*.bin")):
        os.remove(old_shard)
    for name in sorted(os.listdir(staging)):
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)
    meta = {"format": {"magic": MAGIC, "version": VERSION, "header_bytes": HEADER_BYTES, "dtype": "uint16"},
            "source": source, "settings": settings(cfg), **details, "splits": splits}
    write_json(meta_path, meta)
    return meta


if __name__ == "__main__":
    run_main(main)
