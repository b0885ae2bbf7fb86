"""--optimizer=muon: torch.optim.Muon for the hidden matrices, AdamW for the rest, as one optimizer
(gpt_interventions/optimizer.py; interventions.md, Muon)."""

import pytest
import torch

import eval as eval_py
import train
from gpt_interventions.errors import run_main
from gpt_interventions.optimizer import MuonAdamW, configure_optimizer, load_optimizer_state
from gpt_interventions.schedule import get_lr
from gpt_interventions.training import TrainConfig, make_plan
from helpers import EXACT, ROOT, assert_same_run, ckpt_of, curve, read_metrics, stop_after, tiny_flags, torchrun
from model import GPT, GPTConfig
from reference_gpt import assert_plain_gpt2_run, lr_before

MUON = dict(EXACT, optimizer="muon", muon_lr=0.02)
TINY = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50, qkv_bias=True, dropout=0.0)


@pytest.mark.numerics
def test_the_default_adamw_run_is_plain_adamw_on_plain_gpt2(data_dir, tmp_path):
    # warmup, cosine, clipping and dropout against a plain loop (tests/reference_gpt.py)
    train.main(tiny_flags(data_dir, str(tmp_path / "run"), **EXACT))
    assert_plain_gpt2_run(str(tmp_path / "run"))
    assert type(configure_optimizer(GPT(TINY), TrainConfig(), "cpu")) is torch.optim.AdamW
    # every schedule's lrs, from learning_rate's peak given or not, are the formulas' from before
    for schedule, warmup in (("constant", 0), ("constant", 7), ("cosine", 0), ("cosine", 7), ("story", 7)):
        tc = TrainConfig(learning_rate=0.0014, min_lr=1e-5, lr_schedule=schedule, warmup_iters=warmup, max_iters=50)
        plan = make_plan(GPTConfig(), tc, 1)
        before = [lr_before(s, vars(tc), vars(plan)) for s in range(50)]
        for peak in ((), (0.0014,)):
            assert [get_lr(s, tc, plan, *peak) for s in range(50)] == before


def test_every_peak_follows_the_same_schedule():
    for schedule in ("constant", "cosine", "story"):
        tc = TrainConfig(learning_rate=1e-3, min_lr=1e-4, lr_schedule=schedule, warmup_iters=5, max_iters=40)
        plan = make_plan(GPTConfig(), tc, 1)
        for s in range(40):
            assert get_lr(s, tc, plan, 0.02) == pytest.approx(20 * get_lr(s, tc, plan), rel=1e-12)
        assert get_lr(39, tc, plan, 0.02) >= 0.002 - 1e-15  # its floor is min_lr's fraction of its peak


def names_of(model, params):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in params}


def test_muon_takes_exactly_the_2d_weights_inside_the_blocks():
    for tie in (False, True):
        model = GPT(GPTConfig(**{**vars(TINY), "tie_weights": tie}))
        for decay_params in ("all", "matrices"):
            opt = configure_optimizer(model, TrainConfig(optimizer="muon", decay_params=decay_params), "cpu")
            decay, no_decay, muon = opt.param_groups
            assert names_of(model, muon["params"]) == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                                                       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
            assert (muon["lr"], muon["peak_lr"], muon["weight_decay"], muon["momentum"]) == (0.025, 0.025, 0.05, 0.95)
            embeddings = {"transformer.wte.weight", "transformer.wpe.weight"} | ({"lm_head.weight"} if not tie else set())
            if decay_params == "matrices":
                assert names_of(model, decay["params"]) == embeddings
                assert all(p.dim() == 1 for p in no_decay["params"])
            else:
                assert embeddings < names_of(model, decay["params"]) and not no_decay["params"]
            assert (decay["lr"], decay["peak_lr"], decay["weight_decay"]) == (4e-4, 4e-4, 0.1)
            assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_muon_selects_by_shape_and_place_not_by_name():
    # a 2-D weight another switch adds inside a block (a SwiGLU gate, a router) is Muon's; a 3-D
    # stacked weight (experts) and anything outside the blocks is AdamW's
    model = GPT(TINY)
    block = model.transformer.h[0]
    block.gate = torch.nn.Linear(16, 32, bias=False)
    block.experts = torch.nn.Parameter(torch.zeros(4, 16, 16))
    model.extra = torch.nn.Linear(16, 16, bias=False)
    _, _, muon = configure_optimizer(model, TrainConfig(optimizer="muon"), "cpu").param_groups
    names = names_of(model, muon["params"])
    assert "transformer.h.0.gate.weight" in names and len(names) == 9
    assert "transformer.h.0.experts" not in names and "extra.weight" not in names


def one_step(optimizer_name, **flags):
    """(model before, model after) one step from fresh state on random gradients, weight decay off."""
    torch.manual_seed(0)
    model = GPT(TINY)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = configure_optimizer(model, TrainConfig(optimizer=optimizer_name, weight_decay=0.0, muon_weight_decay=0.0,
                                                 **flags), "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return before, dict(model.named_parameters())


def test_the_muon_update_of_a_hidden_matrix_is_near_orthogonal():
    # Muon's defining property: its update is (an approximation of) U V^T of the momentum's SVD
    # U S V^T, so all its singular values are close to 1 (Newton-Schulz's 5 quintic steps leave
    # them in about [0.7, 1.2]); AdamW's first update, lr x g / |g| elementwise, keeps the spread
    # of a random matrix's singular values
    before, after = one_step("muon", muon_lr=0.01)
    _, adamw_after = one_step("adamw", learning_rate=0.01)
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight",
                 "transformer.h.1.mlp.c_proj.weight"):
        rows, cols = before[name].shape
        update = (before[name] - after[name].detach()) / (0.01 * max(1, rows / cols) ** 0.5)  # "original"
        s = torch.linalg.svdvals(update)
        assert s.min() > 0.5 and s.max() < 1.5, (name, s)
        grad = after[name].grad  # the first step's Nesterov momentum is a multiple of the gradient
        u, _, vt = torch.linalg.svd(grad, full_matrices=False)
        cos = torch.nn.functional.cosine_similarity((u @ vt).flatten(), update.flatten(), dim=0)
        assert cos > 0.95, (name, cos)
        s_adamw = torch.linalg.svdvals(before[name] - adamw_after[name].detach())
        assert s_adamw.max() / s_adamw.min() > 2.5, (name, s_adamw)
    # embeddings, head and vectors took AdamW's step: lr x sign(g) on the first step
    for name in ("transformer.wte.weight", "lm_head.weight", "transformer.h.0.ln_1.weight"):
        step = (before[name] - after[name].detach()).abs()
        torch.testing.assert_close(step, torch.full_like(step, 4e-4), rtol=1e-3, atol=0)


def test_match_rms_adamw_gives_every_matrix_an_update_rms_of_a_fifth_of_the_lr():
    # Moonshot's scale 0.2 x sqrt(max(rows, cols)): an orthogonal update has RMS 1/sqrt(max(rows, cols))
    before, after = one_step("muon", muon_lr=0.01, muon_adjust_lr="match_rms_adamw")
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                 "transformer.h.1.mlp.c_proj.weight"):
        rms = (before[name] - after[name].detach()).pow(2).mean().sqrt()
        assert 0.2 * 0.01 * 0.7 < rms < 0.2 * 0.01 * 1.2, (name, rms)


def test_gradscaler_unscales_both_parts_and_skips_both_on_overflow():
    torch.manual_seed(0)
    model = GPT(TINY)
    opt = configure_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
    assert isinstance(opt, MuonAdamW)
    x = torch.randint(0, 50, (2, 8))
    model(x, x)[1].backward()
    true = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for overflow in (True, False):
        before = [p.detach().clone() for p in model.parameters()]
        scaler.scale(model(x, x)[1]).backward()
        if overflow:  # in one Muon matrix only: the whole step is skipped, AdamW's part too
            model.transformer.h[1].mlp.c_fc.weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        if not overflow:  # every group's gradients were divided by the scale, Muon's and AdamW's
            for p, g in zip(model.parameters(), true):
                torch.testing.assert_close(p.grad, g)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
        assert (not any(moved)) if overflow else all(moved)
        assert scaler.get_scale() == 512.0  # halved by the overflow, kept by the good step
    assert len(opt.state) == len(true)  # both parts keep their state in the one optimizer's


def test_state_dict_round_trips_into_a_fresh_optimizer_exactly():
    torch.manual_seed(0)
    model = GPT(TINY)
    opt = configure_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
    x = torch.randint(0, 50, (2, 8))
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    saved = opt.state_dict()
    fresh = configure_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
    fresh.load_state_dict(saved)
    assert fresh.state_dict()["param_groups"] == saved["param_groups"]
    a, b = fresh.parts
    assert a.param_groups == fresh.param_groups[:2] and b.param_groups == fresh.param_groups[2:]
    assert a.state is fresh.state is b.state
    for p in model.parameters():  # both parts step from the loaded state
        key = "momentum_buffer" if any(p is q for q in b.param_groups[0]["params"]) else "exp_avg"
        assert torch.equal(fresh.state[p][key], opt.state[p][key])


def test_a_muon_run_trains_resumes_bitwise_and_evaluates(data_dir, tmp_path, monkeypatch, capsys):
    ref = str(tmp_path / "ref")
    train.main(tiny_flags(data_dir, ref, **MUON))
    rows = curve(ref)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2
    assert ckpt_of(ref)["optimizer"]["param_groups"][2]["peak_lr"] == 0.02
    out = str(tmp_path / "run")
    stop_after(monkeypatch, 6)
    train.main(tiny_flags(data_dir, out, **MUON))
    monkeypatch.undo()
    assert ckpt_of(out)["step"] == 7  # the SIGTERM in step 7 stopped the run after it
    train.main(tiny_flags(data_dir, out, resume=True, **MUON))
    assert_same_run(ref, out)
    capsys.readouterr()
    run_main(eval_py.main, [out, f"--data_dir={data_dir}", "--dataset=syn", "--split=val", "--eval_tokens=1024",
                            "--ledger="])
    assert f"syn/val loss {read_metrics(out)[-1]['val_loss']:.6f}" in capsys.readouterr().out


def test_a_float16_muon_run_with_a_gradscaler_trains_on_the_cpu(data_dir, tmp_path):
    train.main(tiny_flags(data_dir, str(tmp_path / "fp16"), dtype="float16", **MUON))
    rows = curve(tmp_path / "fp16")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2
    assert ckpt_of(tmp_path / "fp16")["scaler"]["scale"] == 65536.0  # no step skipped


RANK_WEIGHTS = """import os, sys
import torch
sys.path.insert(0, {root!r})
import train
from gpt_interventions.errors import run_main
save = train.checkpoint
def checkpoint(t, done):  # every rank also saves the weights it holds
    save(t, done)
    torch.save(t.model.state_dict(), os.path.join(t.tc.out_dir, f"weights.{{t.d.rank}}.pt"))
train.checkpoint = checkpoint
run_main(train.main, sys.argv[1:])
"""


@pytest.mark.slow
def test_two_rank_ddp_muon_ranks_agree_bitwise_and_match_one_process(tmp_path, data_dir):
    # torch's Muon is not distributed-aware and needs not be under DDP: every rank holds the same
    # all-reduced gradient, so each computes the same update for every matrix (the speedrun instead
    # shares the matrices out among the ranks and gathers the updates)
    flags = dict(max_iters=6, eval_interval=3, batch_size=4, optimizer="muon", muon_lr=0.02)
    train.main(tiny_flags(data_dir, str(tmp_path / "one"), **flags))
    script = tmp_path / "rank_weights.py"
    script.write_text(RANK_WEIGHTS.format(root=ROOT))
    proc = torchrun(str(script), tiny_flags(data_dir, str(tmp_path / "two"), **flags))
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / "two" / f"weights.{r}.pt") for r in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    for a, b in zip(curve(tmp_path / "one"), curve(tmp_path / "two"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # against one process (another order of sums): Newton-Schulz works in bfloat16, so each of the
    # 6 steps may differ by up to muon_lr x 2 (c_fc's shape scale) x 2**-7 (bfloat16's ulp at 1)
    wa = ckpt_of(tmp_path / "one")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], w0[k], rtol=0, atol=6 * 0.02 * 2 * 2**-7)


def test_a_checkpoint_from_before_peak_lr_loads_with_this_configs_peaks():
    model = GPT(TINY)
    saved = configure_optimizer(model, TrainConfig(), "cpu").state_dict()
    for group in saved["param_groups"]:
        del group["peak_lr"]  # as checkpoints were written before the optimizer switch
    opt = configure_optimizer(model, TrainConfig(), "cpu")
    load_optimizer_state(opt, saved)
    assert [g["peak_lr"] for g in opt.param_groups] == [4e-4, 4e-4]
