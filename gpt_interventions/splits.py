"""Which split each document of a text corpus lands in (prepare_data.py's split rule).

A document's split key is sha256 of its identity (FineWeb's `id`, else its text), as a number in
[0, 1). Documents with key < holdout_frac are held out and never trained on; the others are the
training split, in file order, capped at max_tokens.

With budgets, the test split is the held-out documents of the shortest prefix of the file list that
holds test_tokens of them, taken in key order up to test_tokens (the last one cut at the budget);
val is the other held-out documents of the shortest prefix that holds enough for both, in key
order up to val_tokens. So the test split is a function of the files, holdout_frac and test_tokens
only: never of val_tokens, max_tokens or how many files were read. Without budgets (a local
corpus), test and val are every file's held-out documents split in two by key.
"""

import hashlib

import numpy as np

from gpt_interventions.errors import UsageError


def split_key(doc_id, text):
    """64-bit split key of a document: a hash of its identity, independent of where it was read."""
    ident = ("id:" + doc_id) if doc_id is not None else ("text:" + text)
    return int.from_bytes(hashlib.sha256(ident.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def held_out_docs(lens, keys, i, holdout):
    """(train tokens, [(key, i, start, length)] of the held-out documents) of file i, from its
    documents' lengths and keys."""
    starts, held = np.cumsum(lens) - lens, keys < holdout
    docs = [(int(k), i, int(a), int(n)) for k, a, n in zip(keys[held], starts[held], lens[held])]
    return int(lens[~held].sum()), docs


def held_out_splits(pool, budgets, holdout, test_files=None):
    """{split: [(file index, start, length)]} from the pool's (key, file index, start, length), or
    None when the pool is too small for the budgets.

    With budgets, test takes the documents of the first `test_files` files in key order up to
    test_tokens (the last one cut at the budget), then val the pool's other documents in key order
    up to val_tokens. Without (budgets None: proportional splits), test is the held-out documents
    with key < holdout / 2 and val the rest, whole.
    """
    pool = sorted(pool)
    if budgets is None:
        half = int(holdout) // 2
        out = {"test": [d[1:] for d in pool if d[0] < half], "val": [d[1:] for d in pool if d[0] >= half]}
        for split, docs in out.items():
            if not docs:
                raise UsageError(f"the corpus is too small: no document falls in its {split} split; add "
                                 "documents, raise --holdout_frac, or set --val_tokens and --test_tokens")
        return out
    out, taken = {}, set()
    for split, files in (("test", test_files), ("val", None)):
        out[split], need = [], budgets[split]
        for _, i, start, length in pool:
            if need <= 0:
                break
            if (files is None or i < files) and (i, start) not in taken:
                out[split].append((i, start, min(length, need)))
                taken.add((i, start))  # a test document cut at the budget is not val's either
                need -= min(length, need)
        if need > 0:
            return None
    return out


class Prefixes:
    """The shortest prefixes of the file list that hold the test split, then val too, found as the
    files are read in order: `files` is {split: number of files, from the first}."""

    def __init__(self, budgets, holdout):
        self.budgets, self.holdout, self.held, self.files = budgets, holdout, [], {}

    @property
    def done(self):
        return len(self.files) == 2

    @property
    def held_tokens(self):
        return sum(d[3] for d in self.held)

    def add(self, file_held, n_files):
        """The held-out documents of file n_files - 1, the files before it already added."""
        if self.done:
            return
        self.held += file_held
        if "test" not in self.files and self.held_tokens >= self.budgets["test"]:
            self.files["test"] = n_files
        if "test" in self.files and held_out_splits(self.held, self.budgets, self.holdout,
                                                    self.files["test"]) is not None:
            self.files["val"] = n_files
