"""The story's mixture-of-experts runs (../shared/story/README.md, "Experts"; interventions.md,
"Mixture of experts"): moe_draws=story draws his initial weights bit for bit, and his routing (a
softmax over each token's top-k router logits) is our renormalised top-k; checked against an
independent construction written here from the README's description of his model."""

import math
import os

import pytest
import torch
import torch.nn as nn

import train
from gpt_interventions.checkpoint import load_checkpoint
from gpt_interventions.moe import MoE, route
from helpers import read_metrics, tiny_flags
from model import GPT, MLP, GPTConfig

SEED = 42  # his code's seed
WIDTH = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50, dropout=0.0)


class Story(nn.Module):
    """His model's modules in the order his code builds them, PyTorch's default init, nothing
    else: per block the attention's separate query, key and value (no bias) and output
    projections, then in the feed-forward's place either one feed-forward or a router (Linear,
    no bias) followed by the experts (each a feed-forward); LayerNorms draw nothing."""

    def __init__(self, c, n_expert):
        super().__init__()
        d = c["n_embd"]
        self.tok_emb = nn.Embedding(c["vocab_size"], d)
        self.pos_emb = nn.Embedding(c["block_size"], d)
        self.blocks = nn.ModuleList()
        for _ in range(c["n_layer"]):
            block = nn.Module()
            block.q, block.k, block.v = (nn.Linear(d, d, bias=False) for _ in range(3))
            block.out = nn.Linear(d, d)
            if n_expert:
                block.router = nn.Linear(d, n_expert, bias=False)
            block.ffs = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU("tanh"), nn.Linear(4 * d, d))
                                      for _ in range(max(n_expert, 1)))
            self.blocks.append(block)
        self.out_head = nn.Linear(d, c["vocab_size"], bias=False)

    def ours(self):
        """{our parameter name: his tensor}, as a GPT with qkv_bias=False holds them."""
        named = {"transformer.wte.weight": self.tok_emb.weight, "transformer.wpe.weight": self.pos_emb.weight,
                 "lm_head.weight": self.out_head.weight}
        for i, b in enumerate(self.blocks):
            p = f"transformer.h.{i}."
            named[p + "attn.c_attn.weight"] = torch.cat([b.q.weight, b.k.weight, b.v.weight])
            named[p + "attn.c_proj.weight"], named[p + "attn.c_proj.bias"] = b.out.weight, b.out.bias
            for e, ff in enumerate(b.ffs):
                mlp = p + (f"mlp.experts.{e}." if hasattr(b, "router") else "mlp.")
                for ours, his in (("c_fc", ff[0]), ("c_proj", ff[2])):
                    named[mlp + ours + ".weight"], named[mlp + ours + ".bias"] = his.weight, his.bias
            if hasattr(b, "router"):
                named[p + "mlp.router.weight"] = b.router.weight
        return named


@pytest.mark.parametrize("n_expert", [0, 6], ids=["dense", "6 experts"])
def test_story_draws_are_his_models_initial_weights_bit_for_bit(n_expert):
    torch.manual_seed(SEED)
    his = Story(WIDTH, n_expert).ours()
    torch.manual_seed(SEED)
    ours = GPT(GPTConfig(**WIDTH, init="torch", n_expert=n_expert, expert_top_k=2, moe_draws="story"))
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith((".ln_1.weight", ".ln_1.bias", ".ln_2.weight",
                                                                            ".ln_2.bias", "ln_f.weight", "ln_f.bias"))}
    assert state.keys() == his.keys()
    for name, v in state.items():
        assert torch.equal(v, his[name]), name
    # and the generator stands where his does after building: the first random draw after it is his too
    torch.manual_seed(SEED)
    Story(WIDTH, n_expert)
    after_his = torch.rand(4)
    torch.manual_seed(SEED)
    GPT(GPTConfig(**WIDTH, init="torch", n_expert=n_expert, expert_top_k=2, moe_draws="story"))
    assert torch.equal(torch.rand(4), after_his)


def test_apart_draws_keep_his_dense_weights_and_draw_the_router_elsewhere():
    torch.manual_seed(SEED)
    dense = Story(WIDTH, 0).ours()
    torch.manual_seed(SEED)
    moe = Story(WIDTH, 6).ours()
    torch.manual_seed(SEED)
    apart = GPT(GPTConfig(**WIDTH, n_expert=6, expert_top_k=2)).state_dict()
    for name, v in dense.items():
        assert torch.equal(apart[name.replace(".mlp.", ".mlp.experts.0.")], v), name
    assert not torch.equal(apart["transformer.h.0.mlp.router.weight"], moe["transformer.h.0.mlp.router.weight"])


@pytest.mark.parametrize("init", ["torch", "gpt2"])
def test_story_draws_change_nothing_without_experts(init):
    torch.manual_seed(SEED)
    a = GPT(GPTConfig(**WIDTH, init=init)).state_dict()
    torch.manual_seed(SEED)
    b = GPT(GPTConfig(**WIDTH, init=init, moe_draws="story")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- his routing is our renormalised top-k --------------------------------------------------------


def his_gates(logits, k):
    """The README's routing: softmax over each token's top-k router logits, the others weight 0."""
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf).softmax(dim=-1)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_his_routing_is_our_renormalised_top_k(k):
    logits = torch.randn(4096, 6, generator=torch.Generator().manual_seed(0)) * 3
    gates, _, chosen = route(logits, k)
    expected = his_gates(logits, k)
    assert torch.equal(gates > 0, expected > 0)  # the same experts
    assert torch.equal(torch.zeros_like(gates).scatter(-1, chosen, 1.0) > 0, expected > 0)
    torch.testing.assert_close(gates, expected, rtol=1e-6, atol=1e-7)  # equal up to float32 rounding


def test_his_moe_forward_is_ours_with_his_weights():
    # his feed-forward in the block's place: each expert on the tokens routed to it, weighted sums
    config = GPTConfig(**WIDTH, n_expert=6, expert_top_k=2)
    torch.manual_seed(SEED)
    moe = MoE(config, MLP).eval()
    x = torch.randn(3, 8, 16)
    with torch.no_grad():
        y, _ = moe(x)
        h = x.flatten(0, 1)
        w = his_gates(h @ moe.router.weight.T, 2)  # his router: a Linear without bias
        expected = torch.zeros_like(h)
        for e, expert in enumerate(moe.experts):
            routed = w[:, e] > 0
            expected[routed] += expert(h[routed]) * w[routed, e:e + 1]
    torch.testing.assert_close(y.flatten(0, 1), expected, rtol=1e-5, atol=1e-6)


def test_his_expert_run_trains_at_tiny_width(data_dir, tmp_path):
    # his runs' expert flags (6 experts, 2 active, no balancing loss, his draws), end to end on the CPU
    out = str(tmp_path / "run")
    train.main(tiny_flags(data_dir, out, n_expert=6, expert_top_k=2, moe_aux_loss=0.0, moe_draws="story",
                          dropout=0.0, max_iters=6, eval_interval=0, charts=False))
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    config = load_checkpoint(os.path.join(out, "ckpt.pt"))["model_config"]
    assert (config["n_expert"], config["expert_top_k"], config["moe_draws"]) == (6, 2, "story")
