"""The book's model format (gpt_interventions/format_book.py): the story's models load, and ours
export, with the same logits as an independent implementation of the book's GPTModel, written
here from its description: separate query/key/value projections, a causal mask buffer, LayerNorm
with scale and shift, a tanh-GELU feed-forward of 4x width, an untied (or tied) head without bias."""

import json
import math
import os
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_file, save_model

import eval as eval_script
from gpt_interventions.errors import UsageError, run_main
from gpt_interventions.formats import load_model
from helpers import make_shards, tiny_run

CFG = {"vocab_size": 96, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0}


class Norm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
        return self.scale * (x - mu) / torch.sqrt(var + 1e-5) + self.shift


class Gelu(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, self.h = c["emb_dim"], c["n_heads"]
        self.W_query, self.W_key, self.W_value = (nn.Linear(d, d, bias=c["qkv_bias"]) for _ in range(3))
        self.out_proj = nn.Linear(d, d)
        self.register_buffer("mask", torch.triu(torch.ones(c["context_length"], c["context_length"]), diagonal=1))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, self.h, d // self.h).transpose(1, 2) for w in (self.W_query, self.W_key, self.W_value))
        scores = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:t, :t], -torch.inf)
        weights = torch.softmax(scores / (d // self.h) ** 0.5, dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["emb_dim"]
        self.att = Attention(c)
        self.ff = nn.Module()
        self.ff.layers = nn.Sequential(nn.Linear(d, 4 * d), Gelu(), nn.Linear(4 * d, d))
        self.norm1, self.norm2 = Norm(d), Norm(d)

    def forward(self, x):
        x = x + self.att(self.norm1(x))
        return x + self.ff.layers(self.norm2(x))


class BookGPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.tok_emb = nn.Embedding(c["vocab_size"], c["emb_dim"])
        self.pos_emb = nn.Embedding(c["context_length"], c["emb_dim"])
        self.trf_blocks = nn.Sequential(*[Block(c) for _ in range(c["n_layers"])])
        self.final_norm = Norm(c["emb_dim"])
        self.out_head = nn.Linear(c["emb_dim"], c["vocab_size"], bias=False)
        if c.get("tie_weights", False):
            self.out_head.weight = self.tok_emb.weight

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        return self.out_head(self.final_norm(self.trf_blocks(x)))


def book_model(qkv_bias, tie, seed=0):
    torch.manual_seed(seed)
    cfg = {**CFG, "qkv_bias": qkv_bias, **({"tie_weights": True} if tie else {})}
    model = BookGPT(cfg).eval()
    with torch.no_grad():  # every parameter nonzero and distinct: the norms' scales and shifts too
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return cfg, model


TOKENS = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(1))
CASES = [(False, False), (True, False), (False, True), (True, True)]
IDS = ["untied", "qkv_bias", "tied", "tied+qkv_bias"]


@pytest.mark.parametrize("qkv_bias, tie", CASES, ids=IDS)
def test_the_storys_saved_models_load_with_equal_logits(tmp_path, qkv_bias, tie):
    cfg, book = book_model(qkv_bias, tie)
    save_model(book, str(tmp_path / "model.safetensors"))  # as the story's code saved them (a tied head once)
    (tmp_path / "model.json").write_text(json.dumps(cfg))
    ours, info = load_model(str(tmp_path))
    assert info["source"] == "book" and ours.config.tie_weights == tie and ours.config.qkv_bias == qkv_bias
    with torch.no_grad():
        assert torch.allclose(ours(TOKENS)[0], book(TOKENS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qkv_bias, tie", CASES, ids=IDS)
def test_the_storys_hub_uploads_load_with_equal_logits(tmp_path, qkv_bias, tie):
    cfg, book = book_model(qkv_bias, tie, seed=3)
    # its wrapper holds the GPTModel as .model: every name prefixed, masks included
    state = {f"model.{k}": v.contiguous() for k, v in book.state_dict().items()}
    if tie:
        del state["model.tok_emb.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpjtgpt2", "cfg": cfg,
                                                      "architectures": ["GPJTGPT2ModelForCausalLM"]}))
    ours, info = load_model(str(tmp_path))
    assert info["source"] == "story-huggingface"
    with torch.no_grad():
        assert torch.allclose(ours(TOKENS)[0], book(TOKENS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qkv_bias, tie", CASES, ids=IDS)
def test_our_runs_export_to_the_book_with_equal_logits(tmp_path_factory, qkv_bias, tie):
    data = make_shards(tmp_path_factory.mktemp("data"), vocab=96)
    tmp = tmp_path_factory.mktemp("run")
    ckpt = tiny_run(data, tmp / "run", qkv_bias=qkv_bias, tie_weights=tie, vocab_size=96, block_size=16,
                    n_embd=32, n_head=4, pad_vocab=True)
    run_main(eval_script.main, [ckpt, f"--export_book={tmp / 'book'}"])
    with open(tmp / "book" / "model.json") as f:
        cfg = json.load(f)
    assert cfg == {**CFG, "drop_rate": 0.0, "qkv_bias": qkv_bias, "tie_weights": tie}
    book = BookGPT(cfg).eval()
    missing, unexpected = st_load_model(book, str(tmp / "book" / "model.safetensors"))  # strict: every key
    assert missing == set() == set(unexpected)
    ours, _ = load_model(ckpt)
    with torch.no_grad():
        assert torch.allclose(ours(TOKENS)[0], book(TOKENS), rtol=1e-5, atol=1e-5)
    back, _ = load_model(str(tmp / "book"))  # and our loader reads our export
    with torch.no_grad():
        assert torch.equal(back(TOKENS)[0], ours(TOKENS)[0])


def test_bad_book_directories_are_one_line(tmp_path, capsys):
    cfg, book = book_model(False, False)
    save_model(book, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps({**cfg, "n_layers": 3}))
    with pytest.raises(UsageError, match="missing trf_blocks.2"):
        load_model(str(tmp_path))
    (tmp_path / "model.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "emb_dim"}))
    with pytest.raises(UsageError, match="lacks emb_dim: not the book's model config"):
        load_model(str(tmp_path))
    (tmp_path / "model.json").write_text(json.dumps(cfg))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(UsageError, match="model.safetensors not found; a directory in the book's format holds"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("change, message", [
    ({"qkv_bias": "false"}, "qkv_bias is 'false', not a <class 'bool'>"),
    ({"n_heads": 5}, "emb_dim 32 is not divisible by n_heads 5"),
    ({"drop_rate": None}, "drop_rate is None"),
    ({"n_layers": 0}, "n_layers is 0, not a positive whole number"),
])
def test_a_bad_model_json_is_one_line(tmp_path, change, message):
    cfg, book = book_model(False, False)
    save_model(book, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(UsageError, match=re.escape(message)):
        load_model(str(tmp_path))


def test_a_tied_file_with_two_different_heads_is_refused(tmp_path):
    cfg, book = book_model(False, False)  # untied weights, then called tied
    save_file({k: v.contiguous() for k, v in book.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps({**cfg, "tie_weights": True}))
    with pytest.raises(UsageError, match="two different tensors for tok_emb and out_head"):
        load_model(str(tmp_path))
