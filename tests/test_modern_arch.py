"""The modern architecture switches of issue 16 (interventions.md, Modern interventions): each one's
defining property, the default model unchanged bit for bit, and a tiny CPU run with them all on that
trains, resumes bitwise, evaluates, samples, and is refused by the GPT-2-shaped exports in one line."""

import dataclasses
import json
import math
import os
import signal
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    EXACT,
    assert_same_run,
    ckpt_of,
    cli,
    curve,
    read_metrics,
    tiny_flags,
    tiny_run,
)

import eval as eval_py
import sample
import train
from gpt_interventions import loader
from gpt_interventions.checkpoint import save_checkpoint
from gpt_interventions.errors import UsageError
from gpt_interventions.format_hf import to_hf
from gpt_interventions.formats import export_hf, load_model
from gpt_interventions.optimizer import configure_optimizer
from gpt_interventions.step import accumulate_gradients
from gpt_interventions.training import TrainConfig
from model import GPT, GPTConfig, apply_rotary, rotary
from reference_gpt import assert_plain_gpt2_run, gpt2_logits, gpt2_loss, weights_digest


def tiny(**kw):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50, dropout=0.0), **kw})


def built(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(tiny(**kw))


DEFAULTS = dict(position="learned", rope_base=10000.0, norm="layernorm", qk_norm=False, mlp="gelu", bias=True,
                logit_softcap=0.0, zero_init_proj=False)


# --- the default model is today's, bit for bit --------------------------------------------------

# digests of the initial state dict, taken on the code before these switches existed (commit
# ea253c4; random draws, the same on every machine), with the new fields at their defaults spelled
# out; logits and loss against plain GPT-2 (tests/reference_gpt.py) in the same process, in training
# mode with dropout 0.1, so that the dropout masks drawn after the init must agree too
@pytest.mark.parametrize("init, switches, state", [
    ("torch", {}, "1175e25c30395bb0"),
    ("torch", dict(qkv_bias=True, tie_weights=True, pad_vocab=True), "8596404ce0a5da92"),
    ("gpt2", {}, "97dfad7f1bab9fdd"),
    ("gpt2", dict(qkv_bias=True, tie_weights=True, pad_vocab=True), "92df3c6971eef4ed")])
@pytest.mark.numerics
def test_defaults_give_the_same_weights_logits_and_loss_as_plain_gpt2(init, switches, state):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50, init=init, **switches,
                          **DEFAULTS))
    assert weights_digest(model.state_dict()) == state
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    rng = torch.get_rng_state()
    out, got = model(idx, idx)
    torch.set_rng_state(rng)
    ref = gpt2_logits(model.state_dict(), idx, 2, 50, dropout=0.1, training=True)
    assert torch.equal(out, ref) and torch.equal(got, gpt2_loss(ref, idx))
    model.eval()
    assert torch.equal(model(idx, idx, z_loss=0.0)[1], model(idx, idx)[1])


@pytest.mark.numerics
def test_default_tiny_run_trains_the_same_weights_as_plain_gpt2(data_dir, tmp_path):
    # 4 steps with dropout, train.py end to end, against a plain loop on plain GPT-2
    out = str(tmp_path / "run")
    train.main(tiny_flags(data_dir, out, max_iters=4, dropout=0.1, total_batch_size=128, charts=False))
    assert_plain_gpt2_run(out)
    ckpt = ckpt_of(out)
    # a checkpoint saved before these fields existed loads with them at their defaults
    for name in DEFAULTS:
        del ckpt["model_config"][name]
    save_checkpoint(str(tmp_path / "old.pt"), ckpt)
    old, new = load_model(str(tmp_path / "old.pt"))[0], load_model(os.path.join(out, "ckpt.pt"))[0]
    assert old.config == new.config
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    assert torch.equal(old.eval()(idx)[0], new.eval()(idx)[0])


# --- the switches leave other weights' draws alone -------------------------------------------------

@pytest.mark.parametrize("init", ["torch", "gpt2"])
@pytest.mark.parametrize("switch", [dict(position="rope"), dict(norm="rmsnorm"), dict(qk_norm=True),
                                    dict(mlp="relu2"), dict(bias=False), dict(logit_softcap=5.0),
                                    dict(zero_init_proj=True), dict(bias=False, qkv_bias=True)])
def test_a_switch_changes_no_other_weights_initial_value(switch, init):
    off = dict(built(init=init, qkv_bias=switch.get("qkv_bias", False)).named_parameters())
    on = dict(built(init=init, **switch).named_parameters())
    zeroed = {n for n in on if ".c_proj." in n} if switch.get("zero_init_proj") else set()
    for name in set(off) & set(on) - zeroed:
        assert torch.equal(off[name], on[name]), name
    for name in zeroed:
        assert not on[name].any() and (off[name].any() or name.endswith("bias")), name
    assert len(set(off) & set(on) - zeroed) >= 10


# --- rope ---------------------------------------------------------------------------------------


def test_rope_at_position_0_is_the_identity_and_elsewhere_a_rotation():
    x = torch.randn(3, 5, 16)
    cos, sin = rotary(torch.zeros(5, dtype=torch.long), 16, 10000.0)
    assert torch.equal(apply_rotary(x, cos, sin), x)
    cos, sin = rotary(torch.arange(5), 16, 10000.0)
    y = apply_rotary(x, cos, sin)
    assert not torch.allclose(y[:, 1:], x[:, 1:])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # lengths kept


def test_rope_is_the_complex_rotation_by_position_times_base_to_the_minus_2i_over_d():
    # independent reference: pair dims (i, i + d/2) as a complex number, multiply by e^(i m theta_i)
    T, d, base = 7, 8, 500.0
    x = torch.randn(T, d, dtype=torch.float64)
    theta = torch.tensor([base ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    z = torch.complex(x[:, : d // 2], x[:, d // 2:]) * torch.polar(torch.ones(T, d // 2, dtype=torch.float64),
                                                                torch.arange(T)[:, None] * theta)
    expected = torch.cat((z.real, z.imag), dim=-1)
    got = apply_rotary(x.float(), *rotary(torch.arange(T), d, base))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(2, 12, 16), torch.randn(2, 12, 16)  # (heads, T, hs)

    def scores(start):
        rope = rotary(torch.arange(start, start + 12), 16, 10000.0)
        return apply_rotary(q, *rope) @ apply_rotary(k, *rope).transpose(-1, -2)  # (heads, T, T)
    torch.testing.assert_close(scores(0), scores(37), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores(0), q @ k.transpose(-1, -2), atol=1e-2)  # positions do matter


def test_rope_has_no_position_table_and_counts_right():
    rope, learned = built(position="rope"), built()
    assert "transformer.wpe.weight" not in dict(rope.named_parameters())
    assert rope.num_params() == learned.num_params() - 8 * 16
    assert rope.flops_per_token() == learned.flops_per_token()  # wpe is no matmul in either
    with pytest.raises(ValueError, match="even head size"):
        GPT(tiny(position="rope", n_embd=18, n_head=2))


# --- rmsnorm and qk_norm -------------------------------------------------------------------------


def test_rmsnorm_is_x_over_root_mean_square_times_gain_with_eps_1e_5():
    norm = built(norm="rmsnorm").transformer.h[0].ln_1
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(4, 16, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 30.0, 1.0])[:, None]
    expected = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x.float()).double(), expected, rtol=1e-5, atol=1e-6)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(norm):
    model = built(qk_norm=True, norm=norm, qkv_bias=True).eval()
    assert model.transformer.h[0].attn.q_norm.weight.shape == (8,)  # per head: hs gains
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    before, _ = model(idx)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:32] *= 10  # the query and key rows
            block.attn.c_attn.bias[:32] *= 10
    after, _ = model(idx)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    plain = built(qkv_bias=True).eval()  # without qk_norm the same scaling sharpens the attention
    before, _ = plain(idx)
    with torch.no_grad():
        plain.transformer.h[0].attn.c_attn.weight[:32] *= 10
    assert not torch.allclose(plain(idx)[0], before, atol=1e-3)


# --- mlp -----------------------------------------------------------------------------------------


def test_swiglu_width_and_exact_parameter_count():
    # h = 8*ceil(C/3): 2048 at 768, where 3*C*h = 8*C^2 exactly, so GPT-2 small's swiglu count is the
    # story's 163,009,536 plus the wider biases: 12 layers x (2h + C - (4C + C)) = 12 x 1024
    assert GPTConfig(mlp="swiglu").mlp_hidden == 2048 and tiny(mlp="swiglu").mlp_hidden == 48
    with torch.device("meta"):
        big = GPT(GPTConfig(mlp="swiglu", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257))
    assert big.num_params() == 163_009_536 + 12 * 1024 == 163_021_824
    for C, bias in ((32, True), (32, False), (100, True)):
        h = 8 * math.ceil(C / 3)
        gelu = GPT(tiny(n_embd=C, n_head=2, bias=bias)).num_params()
        swiglu = GPT(tiny(n_embd=C, n_head=2, bias=bias, mlp="swiglu")).num_params()
        per_layer = (3 * C * h + (2 * h + C) * bias) - (8 * C * C + 5 * C * bias)
        assert swiglu - gelu == 2 * per_layer
        assert 0 <= 3 * C * h - 8 * C * C <= 16 * C  # h - 8C/3 is at most 16/3: within 2/C of GELU's


@pytest.mark.parametrize("kind", ["swiglu", "relu2"])
def test_mlp_variants_compute_their_formula(kind):
    mlp = built(mlp=kind).transformer.h[0].mlp
    x = torch.randn(3, 16)
    fc = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    h = fc * torch.sigmoid(x @ mlp.c_gate.weight.T + mlp.c_gate.bias) * (x @ mlp.c_gate.weight.T + mlp.c_gate.bias) \
        if kind == "swiglu" else torch.clamp(fc, min=0) ** 2
    torch.testing.assert_close(mlp(x), h @ mlp.c_proj.weight.T + mlp.c_proj.bias)
    assert hasattr(mlp, "c_gate") == (kind == "swiglu")


# --- bias ----------------------------------------------------------------------------------------


def test_bias_false_removes_exactly_the_non_qkv_linear_and_layernorm_biases():
    names = {n for n, _ in built(qkv_bias=True).named_parameters()}
    without = {n for n, _ in built(qkv_bias=True, bias=False).named_parameters()}
    per_block = {"attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias", "ln_1.bias", "ln_2.bias"}
    assert names - without == {f"transformer.h.{i}.{n}" for i in range(2) for n in per_block} | {
        "transformer.ln_f.bias"}
    assert "transformer.h.0.attn.c_attn.bias" in without


def test_bias_false_exports_to_hugging_face_as_zero_biases_computing_the_same(tmp_path):
    from transformers import GPT2LMHeadModel
    model = built(bias=False).eval()
    info = {"model": "bias-free", "source": "huggingface", "config": {"model": dataclasses.asdict(model.config)}}
    export_hf(model, str(tmp_path / "hf"), info)
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=1e-5, atol=1e-5)


# --- output: soft-cap and z-loss -----------------------------------------------------------------


def test_softcap_bounds_the_logits_as_cap_tanh_of_the_raw_ones():
    raw, capped = built().eval(), built(logit_softcap=3.0).eval()
    with torch.no_grad():
        raw.lm_head.weight.mul_(100)
        capped.lm_head.weight.mul_(100)
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    a, b = raw(idx)[0], capped(idx)[0]
    assert a.abs().max() > 30 and b.abs().max() <= 3.0  # float32 tanh reaches 1.0 exactly far out
    torch.testing.assert_close(b, 3.0 * torch.tanh(a / 3.0))


@pytest.mark.parametrize("chunk", [7, 2**19])
def test_nll_sum_scores_the_capped_logits_as_forward_does(chunk):
    model = built(logit_softcap=2.0, pad_vocab=True).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    idx, y = (torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    logits, loss = model(idx, y)
    expected = F.cross_entropy(logits.double().flatten(0, 1), y.flatten(), reduction="sum")
    assert model.nll_sum(idx, y, chunk).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() * 24 == pytest.approx(expected.item(), rel=1e-6)
    uncapped = F.cross_entropy(built(pad_vocab=True)(idx)[0].double().flatten(0, 1), y.flatten(), reduction="sum")
    assert abs(expected.item() - uncapped.item()) > 1


def test_z_loss_adds_its_coefficient_times_the_mean_squared_logsumexp():
    model = built()
    idx, y = (torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    logits, ce = model(idx, y)
    _, objective = model(idx, y, z_loss=0.01)
    lse = torch.logsumexp(logits.double(), dim=-1)
    assert objective.item() - ce.item() == pytest.approx(0.01 * lse.square().mean().item(), rel=1e-4)
    # and the training step passes it on: the loss it sums is the objective
    d = SimpleNamespace(device="cpu", device_type="cpu", world_size=1, rank=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    tc = SimpleNamespace(grad_clip=0.0, z_loss=0.01, moe_aux_loss=0.0, seed=0)
    total, _ = accumulate_gradients(model, model, opt, scaler, [(idx.numpy(), y.numpy())], 1, nullcontext(), d, tc,
                                    step=0)
    assert total.item() == objective.item()
    assert model.nll_sum(idx, y).item() == pytest.approx(ce.item() * 24, rel=1e-6)  # eval: no z-loss


# --- zero-initialised output projections ----------------------------------------------------------


@pytest.mark.parametrize("init", ["torch", "gpt2"])
def test_zero_init_proj_makes_every_block_start_as_the_identity(init):
    model = built(init=init, zero_init_proj=True).eval()
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    t = model.transformer
    x = t.wte(idx) + t.wpe(torch.arange(8))
    torch.testing.assert_close(model(idx)[0], model.lm_head(t.ln_f(x)), rtol=0, atol=0)


# --- all of them at once: train, resume, eval, sample, export -------------------------------------

STACKS = {
    "speedrun-like": dict(position="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", bias=False, logit_softcap=15.0,
                          zero_init_proj=True, z_loss=1e-4, init="gpt2", tie_weights=True, pad_vocab=True),
    "llama-like": dict(position="rope", rope_base=500.0, norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True,
                       qk_norm=True, logit_softcap=30.0, z_loss=1e-3),
    "gpt2 plus": dict(qk_norm=True, mlp="swiglu", logit_softcap=10.0, zero_init_proj=True, z_loss=1e-4, qkv_bias=True),
}


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_stacked_switches_train_resume_bitwise_and_evaluate(stack, data_dir, tmp_path, monkeypatch, capsys):
    flags = {**EXACT, **STACKS[stack], "charts": False}  # dropout, warmup, cosine, clipping too
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.main(tiny_flags(data_dir, full, **flags))
    losses = [r["loss"] for r in curve(full)]
    assert max(losses[-3:]) < losses[0] - 0.1, losses  # it learns (the default run: 5.75 -> 5.51)
    batch = loader.TrainLoader.batch

    def preempt(self, s, micro):
        if s == 5 and micro == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # train.py checkpoints after this step and stops
        return batch(self, s, micro)
    monkeypatch.setattr(loader.TrainLoader, "batch", preempt)
    train.main(tiny_flags(data_dir, part, **flags))
    monkeypatch.undo()
    assert ckpt_of(part)["step"] == 6
    train.main(tiny_flags(data_dir, part, resume=True, **flags))
    assert_same_run(full, part)

    capsys.readouterr()
    # eval.py rebuilds the switched model from the checkpoint and scores the validation tokens as
    # train.py's last validation did (the same windows; only the batching differs)
    eval_py.main([os.path.join(full, "ckpt.pt"), f"--data_dir={data_dir}", "--dataset=syn", "--split=val",
                  "--eval_tokens=1024", "--batch_size=3", "--ledger=", "--device=cpu", "--json"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    val = [r["val_loss"] for r in read_metrics(full) if "val_loss" in r][-1]
    assert row["loss"] == pytest.approx(val, rel=1e-6) and row["loss"] < losses[0]
    model, _ = load_model(os.path.join(full, "ckpt.pt"))
    assert {k: getattr(model.config, k) for k in STACKS[stack] if k != "z_loss"} == \
        {k: v for k, v in STACKS[stack].items() if k != "z_loss"}


@pytest.mark.parametrize("export", ["--export_hf", "--export_book"])
def test_exports_refuse_what_gpt2_cannot_compute_in_one_line(export, data_dir, tmp_path, capsys):
    ckpt = tiny_run(data_dir, tmp_path / "run", position="rope", mlp="swiglu", logit_softcap=5.0, charts=False)
    out = tmp_path / "export"
    code, err = cli(eval_py.main, [ckpt, f"{export}={out}"], capsys)
    assert code == 2 and err.count("\n") == 1 and not out.exists()
    assert "position=rope" in err and "mlp=swiglu" in err and "logit_softcap=5.0" in err and "norm=" not in err


def test_export_check_lists_each_switch_gpt2_lacks():
    for switch in (dict(position="rope"), dict(norm="rmsnorm"), dict(qk_norm=True), dict(mlp="relu2"),
                   dict(logit_softcap=1.0)):
        with pytest.raises(UsageError) as e:
            to_hf(built(**switch))
        assert f"{next(iter(switch))}=" in str(e.value)
    for switch in (dict(bias=False), dict(zero_init_proj=True)):  # the same function, or zero biases
        to_hf(built(**switch))


def test_sample_runs_on_a_switched_checkpoint(data_dir, tmp_path, capsys):
    ckpt = tiny_run(data_dir, tmp_path / "wide", vocab_size=50257, max_iters=1, charts=False, **STACKS["llama-like"])
    capsys.readouterr()
    texts = []
    for _ in range(2):
        sample.main([ckpt, "--max_new_tokens=8", "--device=cpu", "--num_samples=1"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("Every effort moves you")


# --- compiled with dynamo's eager backend: the same kernels, the same bits ---------------------


@pytest.mark.numerics
def test_dynamo_with_the_eager_backend_trains_every_switch_bit_for_bit_as_eager():
    # dynamo captures the same ATen calls and replays them in order, no decomposition, no fusion,
    # the dropout masks drawn from the same RNG: forward, backward and 3 Muon steps of every
    # architecture switch at once (experts, z-loss and the balancing loss too) keep every bit,
    # seeded once, so that an RNG draw by the compilation would show (docs/testing.md)
    switches = dict(STACKS["speedrun-like"], n_expert=4, expert_top_k=2, dropout=0.1)
    z_loss = switches.pop("z_loss")

    def train_3_steps(backend):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(tiny(**switches))
        optimizer = configure_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-3), "cpu")
        forward = torch.compile(model, backend=backend) if backend else model
        losses = []
        for step in range(3):
            idx = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(step))
            loss = forward(idx, idx, z_loss=z_loss, moe_aux_loss=0.01)[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses, model.state_dict()

    (eager, weights), (compiled, compiled_weights) = train_3_steps(None), train_3_steps("eager")
    assert compiled == eager
    for name in weights:
        assert torch.equal(compiled_weights[name], weights[name]), name
