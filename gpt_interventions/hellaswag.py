"""HellaSwag accuracy, completion style: which of four endings does the model find most likely?

The file is rowanz/hellaswag's hellaswag_val.jsonl: one JSON object a line with `ctx` (the
context), `endings` (four strings) and `label` (the index of the true ending, 0-3), plus fields we
do not read (ind, activity_label, ctx_a, ctx_b, split, split_type, source_id); the validation set
holds 10,042 examples (format and count as documented in karpathy/build-nanogpt hellaswag.py and
llm.c dev/data/hellaswag.py). The scoring is theirs, "completion style": context tokens are the
GPT-2 BPE of ctx, an ending's are the BPE of " " + ending, and each ending is scored by the
cross-entropy of its tokens given the context; acc_norm picks the lowest mean (per token), acc the
lowest sum. They report GPT-2 124M at acc 0.2859, acc_norm 0.2955 on the validation set.
"""

import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpt_interventions.atomic import atomic_write
from gpt_interventions.device import autocast, device_type_of
from gpt_interventions.errors import UsageError
from gpt_interventions.tokenizer import EOT

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILE = "hellaswag_val.jsonl"
VAL_EXAMPLES = 10_042
ENDINGS = 4


@dataclass
class Example:
    ctx: str
    endings: list
    label: int
    line: int  # where it came from, for messages


def parse(lines, where):
    """Examples from the file's lines (bytes); UsageError naming the first bad line."""
    out = []
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        bad = f"{where} line {i}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise UsageError(f"{bad} is not a JSON object ({str(e)[:80]}); give rowanz/hellaswag's "
                             f"{FILE}") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{bad} is not a JSON object; give rowanz/hellaswag's {FILE}")
        ctx, endings, label = obj.get("ctx"), obj.get("endings"), obj.get("label")
        if not isinstance(ctx, str) or not ctx.strip():
            raise UsageError(f"{bad}: ctx must be a non-empty string, got {str(ctx)[:40]!r}")
        if not (isinstance(endings, list) and len(endings) == ENDINGS and all(isinstance(e, str) for e in endings)):
            raise UsageError(f"{bad}: endings must be a list of {ENDINGS} strings, got {str(endings)[:60]!r}")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < ENDINGS:
            raise UsageError(f"{bad}: label must be 0, 1, 2 or 3 (the true ending), got {label!r}")
        out.append(Example(ctx, endings, label, i))
    if not out:
        raise UsageError(f"{where} holds no examples; give rowanz/hellaswag's {FILE}")
    return out


def read_examples(path):
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UsageError(f"--input={path} does not exist") from None
    except OSError as e:
        raise UsageError(f"--input={path} is not readable ({e.strerror})") from None
    return parse(lines, path)


def fetch(url, timeout=60):
    """The bytes at url (tests replace this or point URL at a local server)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def local_copy(cache_dir, url=None):
    """Path of the validation file in cache_dir, downloaded on first use and kept.

    The download is parsed before it is written (an error page is never cached) and written
    atomically, so ranks that download at once each leave the whole file."""
    url = url or URL  # read at call time: tests point URL at a local server
    path = os.path.join(cache_dir, FILE)
    if os.path.isfile(path):
        return path
    try:
        data = fetch(url)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        why = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e  # HTTP Error 404: ...
        raise UsageError(f"cannot download {url} ({str(why)[:100]}); fetch it where there is network "
                         f"and pass --input=PATH/{FILE}") from None
    parse(data.splitlines(), url)
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))
    return path


def encode(examples, block_size, enc):
    """[(context ids, [ending ids] * 4, label)], the context cut from the left so that it and the
    longest ending fit in block_size; and how many contexts were cut."""
    out, cut = [], 0
    for ex in examples:
        ctx = enc.encode_ordinary(ex.ctx)
        ends = [enc.encode_ordinary(" " + e) for e in ex.endings]
        room = block_size - max(len(e) for e in ends)
        if room < 1:  # an ending needs one token of context before it
            raise UsageError(f"the example at line {ex.line}: an ending of {block_size - room} tokens leaves "
                             f"no room for the context in the model's block_size {block_size}")
        if len(ctx) > room:
            ctx, cut = ctx[-room:], cut + 1
        out.append((ctx, ends, ex.label))
    return out, cut


def check_vocab(model):
    if model.config.vocab_size <= EOT:
        raise UsageError(f"the model's vocab_size is {model.config.vocab_size}; HellaSwag is read with "
                         f"the GPT-2 BPE ({EOT + 1} ids)")


@dataclass
class Score:
    correct_norm: int
    correct: int
    examples: int
    # this rank's examples: index -> (mean losses, summed losses) of the four endings, float64
    losses: dict = field(default_factory=dict)

    @property
    def acc_norm(self):
        return self.correct_norm / self.examples

    @property
    def acc(self):
        return self.correct / self.examples


@torch.no_grad()
def score(model, encoded, device="cpu", dtype="float32", rank=0, world_size=1):
    """Score encoded examples (from `encode`): the four endings of one example in one forward.

    Examples are dealt round-robin to ranks and the counts all-reduced, so any world size scores
    the same examples with the same result."""
    check_vocab(model)
    device_type = device_type_of(device)
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # (correct_norm, correct, examples)
    losses = {}
    for i in range(rank, len(encoded), world_size):
        ctx, ends, label = encoded[i]
        rows = [ctx + e for e in ends]
        x = torch.zeros(ENDINGS, max(map(len, rows)), dtype=torch.long)  # right-padded: causal, pads unseen
        target = torch.zeros_like(x, dtype=torch.bool)  # the ending's tokens
        for j, r in enumerate(rows):
            x[j, :len(r)] = torch.tensor(r)
            target[j, len(ctx):len(r)] = True
        x = x.to(device)
        with autocast(device_type, dtype):
            logits, _ = model(x)  # (4, T, vocab)
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")  # (4, T-1)
        mask = target[:, 1:].to(device)  # position t predicts token t + 1
        sums = (nll.double() * mask).sum(1)
        means = sums / mask.sum(1)
        counts += torch.tensor([int(means.argmin()) == label, int(sums.argmin()) == label, 1], dtype=torch.float64)
        losses[i] = (means.cpu(), sums.cpu())
    if world_size > 1:
        counts = counts.to(device)
        dist.all_reduce(counts)
    model.train(was_training)
    correct_norm, correct, n = (int(c) for c in counts.tolist())
    return Score(correct_norm, correct, n, losses)
