"""Where prepare_data.py's documents come from: local files, or a dataset on the Hugging Face hub.

Readers yield batches of (id or None, text); a missing text field, a broken line or an
unreachable hub is a one-line UsageError.
"""

import glob
import gzip
import json
import os

from gpt_interventions.errors import UsageError

BATCH_DOCS = 512  # documents per batch, which is also the task a tokenizer worker gets


# ----------------------------------------------------------------------------------------------
# reading sources: each yields batches of (id or None, text)


def read_documents(path, text_field, id_field):
    name = os.path.basename(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise UsageError(f"{path} is not a readable parquet file ({e}); re-download or remove it") from None
        names = pf.schema_arrow.names
        if text_field not in names:
            raise UsageError(f"{path} has no column {text_field!r} (columns: {', '.join(names)}); "
                             "use --text_field=NAME")
        cols = [text_field] + ([id_field] if id_field in names else [])
        for batch in pf.iter_batches(batch_size=BATCH_DOCS, columns=cols):
            texts = batch.column(text_field).to_pylist()
            ids = batch.column(id_field).to_pylist() if id_field in names else [None] * len(texts)
            yield [(i if i is None else str(i), t) for i, t in zip(ids, texts) if t]
    elif path.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if path.endswith(".gz") else open
        batch = []
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UsageError(f"{name} line {n} is not valid JSON; fix or remove the line") from None
                if not isinstance(row, dict) or text_field not in row:
                    raise UsageError(f"{name} line {n} has no {text_field!r} field; use --text_field=NAME")
                if row[text_field]:
                    doc_id = row.get(id_field)
                    batch.append((None if doc_id is None else str(doc_id), str(row[text_field])))
                if len(batch) == BATCH_DOCS:
                    yield batch
                    batch = []
        if batch:
            yield batch
    elif path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:  # one plain-text file is one document
            text = f.read()
        if text:
            yield [(None, text)]
    else:
        raise UsageError(f"{path}: unsupported file type; use .parquet, .jsonl, .jsonl.gz or .txt")


# ----------------------------------------------------------------------------------------------
# sources: local files or a hub dataset


def local_files(pattern):
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise UsageError(f"--input={pattern} matches no file; give a path or a quoted glob")
    return paths


def hub_api():
    from huggingface_hub import HfApi  # a function, so tests can put a local fake in its place
    return HfApi()


def hub_download(repo, filename, revision):
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo, filename, repo_type="dataset", revision=revision)


# the same --dataset name keeps the hub's holdout and budgets, so the same files give the same splits
PARQUET_HINT = ("copy its parquet files (in name order, from the first) here and use --input='DIR/*.parquet' "
                "with the same --dataset")


def hub_call(repo, what, fn, hint=PARQUET_HINT):
    """fn(), with any failure to reach the hub as one line that says what to do offline."""
    try:
        return fn()
    except Exception as e:  # offline mode, no route, DNS, HTTP errors all mean the same here
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot {what} {repo} from the Hugging Face hub ({type(e).__name__}: {reason}); "
                         f"on an offline machine {hint}") from None


def hub_revision(repo, revision, hint=PARQUET_HINT):
    """The commit that `revision` (a branch, tag or sha) of a hub dataset resolves to."""
    api = hub_api()
    return hub_call(repo, "reach", lambda: api.dataset_info(repo, revision=revision).sha, hint)


def hub_listing(repo, subset, revision):
    """(resolved commit, sorted parquet file names of the subset)."""
    api = hub_api()
    sha = hub_revision(repo, revision)
    names = hub_call(repo, "list", lambda: api.list_repo_files(repo, repo_type="dataset", revision=sha))
    prefix = subset.strip("/") + "/"
    files = sorted(n for n in names if n.startswith(prefix) and n.endswith(".parquet"))
    if not files:
        raise UsageError(f"{repo} at {sha[:12]} has no parquet files under {prefix}; check --subset")
    return sha, files
