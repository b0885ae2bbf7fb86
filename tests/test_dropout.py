"""Dropout keyed per sequence (gpt_interventions/dropout.py): masks are a function of (seed, step,
the sequence's index in the step, site, element), never of the micro-batch or the rank."""

import os
import shutil

import pytest
import torch

import train
from gpt_interventions.checkpoint import load_checkpoint, save_checkpoint
from gpt_interventions.dropout import keep_mask, mix32, sequence_keys
from helpers import curve, stop_after, tiny_flags
from model import GPT, GPTConfig


def tiny(**kw):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50, dropout=0.5), **kw})


def tokens(rows):
    return torch.randint(0, 50, (rows, 8), generator=torch.Generator().manual_seed(1))


def test_keys_are_a_function_of_seed_step_and_the_sequence_index():
    keys = sequence_keys(42, 3, 0, 8, "cpu")
    assert keys.shape == (8, 2) and keys.dtype == torch.int64 and 0 <= keys.min() and keys.max() < 2**32
    assert torch.equal(sequence_keys(42, 3, 4, 4, "cpu"), keys[4:])  # sequences 4..7 in a micro-batch of their own
    assert len({tuple(k) for k in keys.tolist()}) == 8
    for other in (sequence_keys(43, 3, 0, 8, "cpu"), sequence_keys(42, 4, 0, 8, "cpu")):
        assert not (other == keys).all(dim=1).any()  # another seed or step: other keys for every sequence


def test_mix32_is_a_bijection_and_the_masks_keep_one_minus_p():
    x = torch.arange(2**16) * 65537 % 2**32
    assert len(torch.unique(mix32(x))) == 2**16 and mix32(x).max() < 2**32
    assert mix32(12345) == int(mix32(torch.tensor(12345)))  # Python ints and tensors alike
    keys = sequence_keys(0, 0, 0, 16, "cpu")
    index = torch.arange(2 * 64 * 64)[None]  # each element's index in its sequence
    keep = keep_mask(keys, 7, index, 0.1).view(16, 2, 64, 64)
    assert keep.shape == (16, 2, 64, 64)
    assert keep.float().mean().item() == pytest.approx(0.9, abs=0.003)  # 131,072 draws: 4 standard errors
    assert keep[:, :, :, 0].float().mean().item() == pytest.approx(0.9, abs=0.03)  # no stripes
    assert not torch.equal(keep, keep_mask(keys, 8, index, 0.1).view(16, 2, 64, 64))  # each site its own masks
    assert not torch.equal(keep[0], keep[1])  # each sequence its own


def test_a_sequence_draws_the_same_masks_in_any_micro_batch():
    torch.manual_seed(0)
    model = GPT(tiny(n_expert=2, expert_top_k=1)).train()  # every site: embedding, attention, residuals, experts
    dense = GPT(tiny(n_expert=2, expert_top_k=1, moe_impl="dense")).train()
    dense.load_state_dict(model.state_dict())
    x, keys = tokens(8), sequence_keys(42, 3, 0, 8, "cpu")
    whole, _ = model(x, x, dropout_keys=keys)
    for rows in (slice(0, 4), slice(4, 8), slice(5, 6)):
        part, _ = model(x[rows], x[rows], dropout_keys=keys[rows])
        torch.testing.assert_close(part, whole[rows], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dense(x, x, dropout_keys=keys)[0], whole, rtol=1e-6, atol=1e-6)  # experts drop alike
    other, _ = model(x, x, dropout_keys=sequence_keys(42, 4, 0, 8, "cpu"))
    assert (other - whole).abs().max() > 0.1  # another step: other masks


def test_without_dropout_the_keys_change_no_bit():
    # dropout 0: the forward with keys is today's forward (SDPA, no masks), logits and gradients
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.0, qkv_bias=True)).train()
    x = tokens(4)
    grads = []
    for keys in (None, sequence_keys(42, 0, 0, 4, "cpu")):
        model.zero_grad()
        logits, loss = model(x, x, dropout_keys=keys)
        loss.backward()
        grads.append((logits, [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_the_explicit_attention_is_sdpa_when_nothing_is_dropped():
    torch.manual_seed(0)
    model = GPT(tiny(dropout=1e-12))  # keeps every element (threshold round(1e-12 * 2^32) = 0)
    x = tokens(4)
    explicit, _ = model.train()(x, x, dropout_keys=sequence_keys(0, 0, 0, 4, "cpu"))
    sdpa, _ = model.eval()(x, x)
    torch.testing.assert_close(explicit, sdpa, rtol=1e-5, atol=1e-5)


def test_keyed_dropout_compiles_without_a_graph_break():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=1)).train()
    x, keys = tokens(2), sequence_keys(42, 0, 0, 2, "cpu")
    eager, _ = model(x, x, dropout_keys=keys)
    # dynamo's trace alone (backend eager; inductor's code generation takes minutes on a CPU):
    # fullgraph=True raises at a graph break
    compiled, _ = torch.compile(model, fullgraph=True, backend="eager")(x, x, dropout_keys=keys)
    assert torch.equal(compiled, eager)  # the same masks


def test_resuming_a_checkpoint_of_the_old_rule_says_so(data_dir, tmp_path, monkeypatch, capsys):
    flags = dict(max_iters=4, total_batch_size=128, dropout=0.1, charts=False)
    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    stop_after(monkeypatch, 1)
    train.main(tiny_flags(data_dir, new, **flags))
    monkeypatch.undo()
    shutil.copytree(new, old)
    ckpt = load_checkpoint(os.path.join(old, "ckpt.pt"))
    assert ckpt["step"] == 2 and ckpt["rng"]["dropout"] == "sequence"
    ckpt["rng"] = {"scheme": "dropout reseeded each step from (seed, step, rank)", "seed": 42}  # as written before
    save_checkpoint(os.path.join(old, "ckpt.pt"), ckpt)
    capsys.readouterr()
    train.main(tiny_flags(data_dir, new, resume=True, **flags))
    assert "drew dropout masks per (step, rank)" not in capsys.readouterr().out  # its own rule: no note
    train.main(tiny_flags(data_dir, old, resume=True, **flags))
    notes = [line for line in capsys.readouterr().out.splitlines() if "drew dropout masks per (step, rank)" in line]
    assert len(notes) == 1 and "from step 2 on they are drawn per sequence" in notes[0]
    assert curve(old) == curve(new)  # and goes on under the new rule
