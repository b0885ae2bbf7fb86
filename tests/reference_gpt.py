"""GPT-2 and its training written out plainly, with no switch: the reference that proves, in the
same process, that model.py and train.py with every switch at its default compute what they
computed before the switches existed (learned positions, LayerNorm, a GELU MLP, AdamW).

Bitwise, on any CPU and thread count: the reference calls the same kernels in the same order
(the same dropout masks too), so the only way to differ is for a switch to change the default.
What no kernel computes (the initial weights' random draws, token ids) is checked elsewhere
against constants.
"""

import hashlib
import json
import math
import os

import torch
import torch.nn.functional as F

from gpt_interventions.dropout import keyed_dropout, sequence_keys, site_number
from gpt_interventions.loader import TrainLoader, eval_windows, read_windows
from gpt_interventions.shards import find_shards
from helpers import ckpt_of, read_metrics
from model import GPT, GPTConfig

# tests/helpers.py tiny_flags' model (seed 42, either dropout) as commit ea253c4 drew it, before
# the switches existed: its initial weights are random draws, the same on every machine
TINY_INITIAL = "959ec1ebf587e0cf"


def weights_digest(tensors):
    """The first 16 hex digits of the sha256 of a state dict's names and bytes."""
    h = hashlib.sha256()
    for k, v in tensors.items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def gpt2_logits(p, idx, n_head, vocab_size, dropout=0.0, training=False, keys=None):
    """Logits (B, T, vocab_size) of GPT-2 from p, a state dict with GPT-2's names (a tied head is
    lm_head.weight = transformer.wte.weight; padded vocabulary rows are sliced off); dropout is
    drawn where nanoGPT draws it: embeddings, attention weights, both residual branches; with keys
    (B, 2) from each sequence's key at each site (gpt_interventions/dropout.py), attention then
    computed as the book computes it."""
    B, T = idx.shape

    def drop(t, site):
        if keys is None or not training or dropout == 0:
            return F.dropout(t, dropout, training)
        return keyed_dropout(t, keys, site_number(site), dropout)

    def attention(q, k, v, i):
        if keys is None or not training or dropout == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout if training else 0.0)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(dim=-1)
        return drop(att, f"transformer.h.{i}.attn.attn_dropout") @ v
    C = p["transformer.wte.weight"].size(1)
    hs = C // n_head
    x = F.embedding(idx, p["transformer.wte.weight"]) + F.embedding(torch.arange(T), p["transformer.wpe.weight"])
    x = drop(x, "transformer.drop")
    n_layer = 1 + max(int(k.split(".")[2]) for k in p if k.startswith("transformer.h."))
    for i in range(n_layer):
        w = {k.removeprefix(f"transformer.h.{i}."): v for k, v in p.items() if k.startswith(f"transformer.h.{i}.")}
        h = F.layer_norm(x, (C,), w["ln_1.weight"], w["ln_1.bias"])
        q, k, v = F.linear(h, w["attn.c_attn.weight"], w.get("attn.c_attn.bias")).split(C, dim=2)
        q, k, v = (t.view(B, T, n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = attention(q, k, v, i)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        x = x + drop(F.linear(y, w["attn.c_proj.weight"], w["attn.c_proj.bias"]), f"transformer.h.{i}.attn.resid_dropout")
        h = F.layer_norm(x, (C,), w["ln_2.weight"], w["ln_2.bias"])
        h = F.gelu(F.linear(h, w["mlp.c_fc.weight"], w["mlp.c_fc.bias"]), approximate="tanh")
        x = x + drop(F.linear(h, w["mlp.c_proj.weight"], w["mlp.c_proj.bias"]), f"transformer.h.{i}.mlp.dropout")
    x = F.layer_norm(x, (C,), p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
    return F.linear(x, p["lm_head.weight"])[..., :vocab_size]


def gpt2_loss(logits, targets):
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def lr_before(step, tc, plan):
    """The learning rate of `step` by the schedules' formulas as they were before per-group peaks."""
    peak, floor, warmup, steps = tc["learning_rate"], tc["min_lr"], plan["warmup_steps"], plan["max_steps"]
    if tc["lr_schedule"] == "story":
        if step < warmup:
            return peak * (1e-5 + (1 - 1e-5) * step / warmup)
        return floor + (peak - floor) * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))) / 2
    if step < warmup:
        return peak * (step + 1) / warmup
    if tc["lr_schedule"] == "constant":
        return peak
    span = steps - 1 - warmup
    progress = (step - warmup) / span if span > 0 else 1.0
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def plain_run(out, initial):
    """Train `initial` (a state dict) as the run in `out` was configured (its config.json), by a
    plain loop: the same batches and dropout keys, AdamW on every parameter, the lr formulas,
    clip_grad_norm_. Returns (weights, AdamW's state, [(step, loss)], [(step, val_loss)]); the
    val losses from the full logits in float64, which the run's sliced head matches up to float
    rounding only."""
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    mc, tc, plan = config["model"], config["train"], config["derived"]
    params = {k: v.clone().requires_grad_() for k, v in initial.items() if k != "lm_head.weight"}
    params["lm_head.weight"] = params["transformer.wte.weight"] if mc["tie_weights"] else \
        initial["lm_head.weight"].clone().requires_grad_()
    unique = list({id(v): v for v in params.values()}.values())  # model.parameters()' order
    optimizer = torch.optim.AdamW(unique, lr=tc["learning_rate"], betas=(tc["beta1"], tc["beta2"]), eps=tc["eps"],
                                  weight_decay=tc["weight_decay"])
    shards = find_shards(tc["data_dir"], tc["dataset"], "train")
    loader = TrainLoader(shards, plan["tokens_per_step"], tc["batch_size"], mc["block_size"], plan["accum"], 0, 1,
                         tc["data_seed"], mc["vocab_size"])
    windows = eval_windows(find_shards(tc["data_dir"], tc["dataset"], "val"), mc["block_size"], tc["eval_tokens"])

    def logits(x, training, keys=None):
        return gpt2_logits(params, x, mc["n_head"], mc["vocab_size"], mc["dropout"], training, keys)

    losses, val_losses = [], []
    for step in range(plan["max_steps"]):
        optimizer.param_groups[0]["lr"] = lr_before(step, tc, plan)
        loss_sum = torch.zeros(())
        for micro in range(plan["accum"]):
            x, y = (torch.from_numpy(a) for a in loader.batch(step, micro))
            keys = sequence_keys(tc["seed"], step, micro * len(x), len(x), "cpu")  # sequences of the step
            loss = gpt2_loss(logits(x, True, keys), y)
            loss_sum += loss.detach()
            (loss / plan["accum"]).backward()
        if tc["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(unique, tc["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append((step + 1, (loss_sum / plan["accum"]).item()))
        if (tc["eval_interval"] and (step + 1) % tc["eval_interval"] == 0) or step + 1 == plan["max_steps"]:
            with torch.no_grad():
                x, y = (torch.from_numpy(a) for a in read_windows(windows, mc["block_size"], mc["vocab_size"]))
                nll = F.cross_entropy(logits(x, False).flatten(0, 1), y.flatten(), reduction="none")
                val_losses.append((step + 1, nll.double().sum().item() / y.numel()))
    return {k: v.detach() for k, v in params.items()}, optimizer.state_dict()["state"], losses, val_losses


def assert_plain_gpt2_run(out):
    """The finished run in `out` (tiny_flags' model, switches at their defaults) started from the
    weights drawn before the switches existed and trained exactly as plain_run does: the same
    weights, AdamW state and training losses bit for bit, the validation losses within 1e-6
    relative (float rounding: the run scores a sliced head)."""
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    torch.manual_seed(config["train"]["seed"])
    initial = GPT(GPTConfig(**config["model"])).state_dict()
    assert weights_digest(initial) == TINY_INITIAL
    weights, state, losses, val_losses = plain_run(out, initial)
    ckpt = ckpt_of(out)
    assert ckpt["model"].keys() == weights.keys()
    for k in weights:
        assert torch.equal(ckpt["model"][k], weights[k]), k
    assert ckpt["optimizer"]["state"].keys() == state.keys()
    for i in state:
        for k in state[i]:
            assert torch.equal(ckpt["optimizer"]["state"][i][k], state[i][k]), (i, k)
    rows = read_metrics(out)
    assert [(r["step"], r["loss"]) for r in rows if "loss" in r] == losses
    got_val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert [s for s, _ in got_val] == [s for s, _ in val_losses]
    for (_, a), (_, b) in zip(got_val, val_losses):
        assert abs(a - b) <= 1e-6 * b
