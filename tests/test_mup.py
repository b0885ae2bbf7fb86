"""parametrization=mup (model.py, gpt_interventions/optimizer.py): the default is the code without
it, bit for bit; at its base width mup is standard; away from it, activations stay flat across width."""

import math

import pytest
import torch
import torch.nn.functional as F

from gpt_interventions.errors import UsageError
from gpt_interventions.optimizer import configure_optimizer
from gpt_interventions.training import TrainConfig, make_plan
from model import GPT, GPTConfig


def config(**kw):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0), **kw})


def tokens(seed=1, batch=8, vocab=64, length=16):
    idx = torch.randint(0, vocab, (batch, length + 1), generator=torch.Generator().manual_seed(seed))
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def reference_gpt2_init(model, seed):
    """GPT-2's init written out without any width rule: N(0, 0.02), residual projections
    / sqrt(2 * n_layer), biases 0, norms 1, drawn in the model's init order."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in sum(model._init_order(), []):
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                std = 0.02 / (math.sqrt(2 * model.config.n_layer) if getattr(m, "RESIDUAL_SCALE", False) else 1)
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
    return model


def reference_logits(model, idx):
    """GPT-2's forward written out from the modules, with SDPA's own 1/sqrt(d_head) and no logit scale."""
    t, (B, T), C = model.transformer, idx.shape, model.config.n_embd
    x = t.wte(idx) + t.wpe(torch.arange(T))
    for b in t.h:
        q, k, v = (z.view(B, T, model.config.n_head, -1).transpose(1, 2) for z in b.attn.c_attn(b.ln_1(x)).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + b.attn.c_proj(y)
        x = x + b.mlp.c_proj(b.mlp.gelu(b.mlp.c_fc(b.ln_2(x))))
    return model.lm_head(t.ln_f(x))


def reference_adamw(model, tc):
    """The optimizer without muP: one AdamW, decayed matrices and undecayed vectors at one lr."""
    params = list(model.parameters())
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=tc.learning_rate, betas=(tc.beta1, tc.beta2), eps=tc.eps)


def train_steps(model, opt, steps=2):
    x, y = tokens()
    for _ in range(steps):
        opt.zero_grad()
        model(x, y)[1].backward()
        opt.step()
    return model


@pytest.mark.parametrize("width", [32, 128])
def test_standard_is_the_code_without_mup_bit_for_bit(width):
    """The default (standard) draws, computes and steps exactly as an implementation with no muP in it."""
    tc = TrainConfig(learning_rate=3e-3, decay_params="matrices")
    torch.manual_seed(5)
    ours = GPT(config(n_embd=width, init="gpt2"))
    ref = reference_gpt2_init(GPT(config(n_embd=width, init="gpt2")), seed=5)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    x, _ = tokens()
    assert torch.equal(ours(x)[0], reference_logits(ref, x))
    train_steps(ours, configure_optimizer(ours, tc, "cpu"))
    train_steps(ref, reference_adamw(ref, tc))
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("init", ["torch", "gpt2"])
def test_mup_at_its_base_width_is_standard(init):
    """With n_embd = mup_base_width and 64-wide heads every muP factor is 1: the same weights, logits
    and training steps as standard (so a base-width model tuned under either is the same model)."""
    runs = []
    for param in ("standard", "mup"):
        torch.manual_seed(3)
        model = GPT(config(n_embd=128, init=init, parametrization=param, mup_base_width=128))
        x, _ = tokens()
        logits = model(x)[0]
        train_steps(model, configure_optimizer(model, TrainConfig(learning_rate=3e-3), "cpu"))
        runs.append((logits, model.state_dict()))
    assert torch.equal(runs[0][0], runs[1][0])
    for name, a in runs[0][1].items():
        assert torch.equal(a, runs[1][1][name]), name


def test_mup_scales_hidden_init_and_lr_by_the_width_ratio():
    torch.manual_seed(0)
    model = GPT(config(n_embd=256, init="gpt2", parametrization="mup", mup_base_width=64))
    opt = configure_optimizer(model, TrainConfig(learning_rate=1e-3), "cpu")
    hidden = {id(p) for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    for group in opt.param_groups:
        rates = {group["peak_lr"]}
        assert all((id(p) in hidden) == (group["peak_lr"] == 1e-3 / 4) for p in group["params"]), rates
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert abs(fc.std().item() - 0.02 / 2) < 0.001  # 0.02 / sqrt(m), m = 4 (std of 262,144 draws: +-0.00003)
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.001  # input weights: no width rule


def activation_sizes(width, parametrization, steps=3, lr=1e-2):
    """Mean |x| of each block's output and of the logits after `steps` AdamW steps at a fixed lr."""
    torch.manual_seed(0)
    model = GPT(config(n_embd=width, init="gpt2", parametrization=parametrization, mup_base_width=64))
    opt = configure_optimizer(model, TrainConfig(learning_rate=lr, weight_decay=0.0), "cpu")
    train_steps(model, opt, steps)
    sizes = []
    for block in model.transformer.h:
        block.register_forward_hook(lambda m, i, out: sizes.append(out[0].abs().mean().item()))
    with torch.no_grad():
        logits = model(tokens()[0])[0]
    return sizes + [logits.abs().mean().item()]


def test_coordinate_check_activations_stay_flat_under_mup_and_grow_under_standard():
    """muP's coordinate check (arXiv 2203.03466, Fig. 5): widths 64, 128, 256 at one lr. Under
    standard, Adam moves each coordinate of a width-n layer's output by about lr x n, so from 64 to 256
    the sizes grow up to 4x (measured here: 3.2x for the logits, 11x in the blocks, whose gpt2 init
    also grows as sqrt(n)); we ask for more than 2.5x. Under mup they stay O(1): measured within
    0.66x-0.86x, finite-width wobble, so we ask for less than a factor 2 either way."""
    for param in ("standard", "mup"):
        narrow, mid, wide = (activation_sizes(w, param) for w in (64, 128, 256))
        ratios = [w / n for n, w in zip(narrow, wide)]
        assert len(ratios) == 3 and all(math.isfinite(r) for r in ratios)
        if param == "standard":
            assert min(ratios) > 2.5, ratios
        else:
            assert all(0.5 < r < 2 for r in ratios + [m / n for n, m in zip(narrow, mid)]), ratios


def test_mup_with_muon_refuses_a_width_dependent_adjustment():
    mc = GPTConfig(parametrization="mup")
    make_plan(mc, TrainConfig(optimizer="muon"), 8)
    with pytest.raises(UsageError, match="muon_adjust_lr=original"):
        make_plan(mc, TrainConfig(optimizer="muon", muon_adjust_lr="match_rms_adamw"), 8)
    with pytest.raises(UsageError, match="mup_base_width"):
        make_plan(GPTConfig(mup_base_width=0), TrainConfig(), 8)
