"""Mixture of experts (GPTConfig n_expert, expert_top_k; TrainConfig moe_aux_loss;
gpt_interventions/moe.py): one expert is the dense MLP, routing is top-k, the balancing loss is
1 for uniform routing, off by default nothing changes, and a run trains, logs and charts its
routing, resumes bitwise, evaluates, and is refused by the exports in one line."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eval as eval_py
import train
from gpt_interventions.charts import ROUTING, read_run, save
from gpt_interventions.formats import load_model
from gpt_interventions.loader import eval_windows, read_windows
from gpt_interventions.moe import MoE, assignment_fractions, balance_loss, route
from gpt_interventions.shards import find_shards
from gpt_interventions.training import TrainConfig
from helpers import EXACT, assert_same_run, cli, read_metrics, tiny_flags
from model import GPT, MLP, GPTConfig
from reference_gpt import assert_plain_gpt2_run, gpt2_logits, gpt2_loss, weights_digest

MOE = dict(n_expert=4, expert_top_k=2, moe_aux_loss=0.01)


def tiny(**kw):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50), **kw})


# --- one expert is the dense MLP ------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train (dropout)", "eval"])
@pytest.mark.numerics
def test_one_expert_with_k1_computes_exactly_the_dense_mlp(training):
    config = tiny(dropout=0.1, n_expert=1, expert_top_k=1)
    torch.manual_seed(0)
    moe, dense = MoE(config, MLP), MLP(config)
    dense.load_state_dict({k.removeprefix("experts.0."): v for k, v in moe.state_dict().items() if k != "router.weight"})
    moe.train(training), dense.train(training)
    x = torch.randn(3, 8, 16, requires_grad=True)
    torch.manual_seed(1)
    y, balance = moe(x)
    torch.manual_seed(1)  # the same dropout mask
    expected = dense(x)
    assert torch.equal(y, expected)
    assert balance.item() == 1.0  # one expert takes every token with probability 1
    (g_moe,) = torch.autograd.grad(y.square().sum(), x)
    (g_dense,) = torch.autograd.grad(expected.square().sum(), x)
    assert torch.equal(g_moe, g_dense)


def shared_with_dense(state):
    """The state dict's tensors that the dense model also has, under the dense model's names: everything
    but the router and experts 1..E-1, expert 0 named as the block's MLP."""
    return {k.replace(".experts.0.", "."): v for k, v in state.items()
            if "router" not in k and (".experts." not in k or ".experts.0." in k)}


# each other switch alone and all together, each with qkv_bias off and on (the
# QKV biases were drawn after the router and experts 1..E-1, so experts moved them)
OTHERS = [dict(), dict(tie_weights=True), dict(pad_vocab=True), dict(bias=False), dict(mlp="swiglu"),
          dict(mlp="relu2"), dict(norm="rmsnorm"), dict(qk_norm=True), dict(position="rope"),
          dict(zero_init_proj=True), dict(logit_softcap=5.0),
          dict(tie_weights=True, pad_vocab=True, bias=False, mlp="swiglu", norm="rmsnorm", qk_norm=True,
               position="rope", zero_init_proj=True, logit_softcap=5.0)]


@pytest.mark.parametrize("init", ["torch", "gpt2"])
@pytest.mark.parametrize("qkv_bias", [False, True], ids=["no qkv_bias", "qkv_bias"])
def test_switching_experts_on_moves_no_other_weights_initial_draw(init, qkv_bias):
    # expert 0 draws the dense MLP's initial weights and the router and experts 1..E-1 are drawn
    # after every other weight, the QKV biases included, so switching experts on moves no other
    # weight (GPT._init_order); and switching qkv_bias moves none of the experts' draws
    for others in OTHERS:
        config = dict(init=init, qkv_bias=qkv_bias, **others)
        torch.manual_seed(0)
        dense = GPT(tiny(**config)).state_dict()
        for n_expert, k in ((1, 1), (2, 1), (4, 2), (6, 2), (6, 6)):
            torch.manual_seed(0)
            moe = GPT(tiny(**config, n_expert=n_expert, expert_top_k=k)).state_dict()
            shared = shared_with_dense(moe)
            assert shared.keys() == dense.keys(), (others, n_expert)
            for name, v in shared.items():
                assert torch.equal(v, dense[name]), (others, n_expert, name)
            torch.manual_seed(0)
            flipped = GPT(tiny(**{**config, "qkv_bias": not qkv_bias}, n_expert=n_expert, expert_top_k=k)).state_dict()
            for name, v in flipped.items():
                if "router" in name or ".experts." in name:
                    assert torch.equal(v, moe[name]), (others, n_expert, name)


@pytest.mark.parametrize("init", ["torch", "gpt2"])
@pytest.mark.numerics
def test_one_expert_model_computes_the_dense_model_from_the_same_seed(init):
    torch.manual_seed(0)
    dense = GPT(tiny(init=init))
    torch.manual_seed(0)
    moe = GPT(tiny(init=init, n_expert=1))
    idx = torch.randint(0, 50, (2, 8))
    torch.manual_seed(3)
    logits, loss = dense(idx, idx)
    torch.manual_seed(3)
    logits_moe, loss_moe = moe(idx, idx, moe_aux_loss=0.5)
    assert torch.equal(logits, logits_moe)
    assert loss_moe.item() == pytest.approx(loss.item() + 0.5, abs=1e-6)  # the balancing loss of one expert is 1


# --- routing is top-k ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_each_token_gets_the_gated_sum_of_exactly_its_top_k_experts(k):
    config = tiny(dropout=0.0, n_expert=5, expert_top_k=k)
    torch.manual_seed(0)
    moe = MoE(config, MLP).eval()
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)  # spread the router's probabilities
    x = torch.randn(4, 8, 16)
    with torch.no_grad():
        y, _ = moe(x)
        h = x.flatten(0, 1).double()
        outs = [copy.deepcopy(e).double()(h) for e in moe.experts]  # float64 copies
        probs = (h @ moe.router.weight.double().T).softmax(-1)
    y = y.flatten(0, 1)
    for t in range(h.size(0)):
        order = sorted(range(5), key=lambda e: -probs[t, e].item())
        chosen = order[:k]
        gates = {e: probs[t, e].item() for e in chosen}
        if k > 1:  # renormalised over the chosen experts (GShard, Mixtral); k = 1: the probability (Switch)
            gates = {e: g / sum(gates.values()) for e, g in gates.items()}
        expected = sum(g * outs[e][t] for e, g in gates.items())
        torch.testing.assert_close(y[t].double(), expected, rtol=1e-5, atol=1e-6)
    # and the experts a token did not choose play no part: change them, and its output stays bit for bit
    chosen = probs.topk(k, dim=-1).indices
    with torch.no_grad():
        for e in range(5):
            untouched = ~(chosen == e).any(-1)  # tokens that did not choose expert e
            before, _ = moe(x)
            for p in moe.experts[e].parameters():
                p.add_(3.0)
            after, _ = moe(x)
            assert torch.equal(before.flatten(0, 1)[untouched], after.flatten(0, 1)[untouched])
            assert untouched.all() or not torch.equal(before.flatten(0, 1)[~untouched], after.flatten(0, 1)[~untouched])


def test_route_gates_sum_to_one_for_k_above_1_and_are_exactly_1_for_one_expert():
    logits = torch.randn(64, 6)
    gates, probs, chosen = route(logits, 3)
    assert ((gates > 0).sum(-1) == 3).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(64))
    assert torch.equal(chosen, probs.topk(3, dim=-1).indices)
    gates, _, _ = route(torch.randn(64, 1) * 100, 1)
    assert (gates == 1.0).all()


# --- the balancing loss --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_balancing_loss_is_1_for_uniform_routing_and_grows_with_skew(k):
    E, n = 4, 64
    # uniform router probabilities: P_i = 1/E, so E * sum f_i P_i = sum f_i = 1 whatever the choices
    logits = torch.zeros(n, E)
    assert balance_loss(*route(logits, k)[1:]).item() == pytest.approx(1.0, abs=1e-6)
    # confident routing spread evenly over the experts: f = P = 1/E each
    logits = 30.0 * torch.nn.functional.one_hot(torch.arange(n) % E, E).float()
    assert balance_loss(*route(logits, 1)[1:]).item() == pytest.approx(1.0, abs=1e-6)
    # every token confidently to expert 0: f_0 = P_0 = 1, the maximum, E
    logits = 30.0 * torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), E).float()
    assert balance_loss(*route(logits, 1)[1:]).item() == pytest.approx(E, abs=1e-6)
    # even tokens to expert 0, odd ones to 1 and 3 in turn: f = P = (1/2, 1/4, 0, 1/4), E * sum f^2 = 1.5
    logits = 30.0 * torch.nn.functional.one_hot(torch.where(torch.arange(n) % 2 == 0, 0, torch.arange(n) % E), E).float()
    assert balance_loss(*route(logits, 1)[1:]).item() == pytest.approx(1.5, abs=1e-6)


@given(experts=st.lists(st.integers(0, 5), min_size=1, max_size=40))
@settings(max_examples=50, deadline=None)
def test_balancing_loss_of_confident_routing_is_E_sum_f_squared_at_least_1(experts):
    # where each token's probability sits on its chosen expert, P = f and the loss is
    # E * sum f_i^2 >= 1 (Cauchy-Schwarz), with equality only for a balanced load
    E = 6
    logits = 40.0 * torch.nn.functional.one_hot(torch.tensor(experts), E).float()
    _, probs, chosen = route(logits, 1)
    f = torch.bincount(torch.tensor(experts), minlength=E).double() / len(experts)
    loss = balance_loss(probs, chosen).item()
    assert loss == pytest.approx(E * (f ** 2).sum().item(), rel=1e-6)
    assert loss >= 1 - 1e-6
    assert (loss < 1 + 1e-6) == bool((f == 1 / E).all())


def test_assignment_fractions_count_every_chosen_expert_once():
    chosen = torch.tensor([[0, 1], [0, 2], [0, 1]])
    assert assignment_fractions(chosen, 4).tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6, 0.0], abs=1e-7)


# --- off by default: the default model and run are bit-identical to before -----------------------


def test_off_by_default():
    assert GPTConfig().n_expert == 0 and TrainConfig().moe_aux_loss == 0.0
    assert not any(isinstance(m, MoE) for m in GPT(tiny()).modules())


# The initial weights' digests were taken on the code before mixture of experts existed (commit
# ea253c4; random draws, the same on every machine); the loss and logits in train mode (dropout
# drawn from seed 3) and in eval mode against plain GPT-2 (tests/reference_gpt.py), bit for bit.
@pytest.mark.parametrize("init, weights", [("torch", "1175e25c30395bb0"), ("gpt2", "97dfad7f1bab9fdd")])
@pytest.mark.numerics
def test_default_model_is_bit_identical_to_plain_gpt2(init, weights):
    torch.manual_seed(0)
    model = GPT(tiny(init=init))
    assert weights_digest(model.state_dict()) == weights
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    for training in (True, False):
        model.train(training)
        torch.manual_seed(3)
        logits, loss = model(idx, idx)
        torch.manual_seed(3)
        ref = gpt2_logits(model.state_dict(), idx, 2, 50, dropout=0.1, training=training)
        assert torch.equal(logits, ref) and torch.equal(loss, gpt2_loss(ref, idx)), training


@pytest.mark.numerics
def test_default_run_is_bit_identical_to_plain_gpt2(data_dir, tmp_path):
    # a 6-step tiny run with dropout and validation, against a plain loop on plain GPT-2
    out = str(tmp_path / "run")
    train.main(tiny_flags(data_dir, out, max_iters=6, dropout=0.1, eval_interval=3))
    assert not any(ROUTING in r for r in read_metrics(out))
    assert_plain_gpt2_run(out)


# --- a tiny run: trains, logs and charts routing, resumes bitwise, evaluates ----------------------


@pytest.fixture(scope="module")
def moe_run(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("moe") / "run")
    train.main(tiny_flags(data_dir, out, **EXACT, **MOE))
    return out


def test_a_moe_run_trains_and_logs_each_layers_routing(moe_run, data_dir):
    rows = [r for r in read_metrics(moe_run) if "loss" in r]
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"] - 0.2
    tokens = 4 * 32  # routing is measured on the first batch_size validation windows
    for r in rows:
        frac = r[ROUTING]
        assert len(frac) == 2 and all(len(layer) == 4 for layer in frac)
        for layer in frac:
            assert sum(layer) == pytest.approx(1.0, abs=1e-6)
            counts = [f * tokens * 2 for f in layer]  # k = 2 assignments per token
            assert counts == pytest.approx([round(c) for c in counts], abs=1e-4)
    # the last row's shares are the final model's routing, counted here with a plain topk
    model, _ = load_model(os.path.join(moe_run, "ckpt.pt"))
    x, _ = read_windows(eval_windows(find_shards(data_dir, "syn", "val"), 32)[:4], 32, 256)
    logits = []
    for block in model.transformer.h:
        block.mlp.router.register_forward_hook(lambda _m, _i, out: logits.append(out))
    with torch.no_grad():
        model.eval()(torch.from_numpy(x))
    for layer, z in zip(rows[-1][ROUTING], logits):
        counts = torch.bincount(z.softmax(-1).topk(2, dim=-1).indices.flatten(), minlength=4)
        assert layer == pytest.approx((counts / counts.sum()).tolist(), abs=1e-7)


def test_a_moe_run_charts_its_routing(moe_run, tmp_path):
    with open(os.path.join(moe_run, "charts", f"{ROUTING}.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    drawn = save([read_run(moe_run)], str(tmp_path))
    name = read_run(moe_run)[0]
    labels = [label for label in drawn[str(tmp_path / f"{ROUTING}.png")] if not label.startswith("_")]
    assert labels == [f"{name} largest share (a line per layer)", f"{name} smallest share", f"{name} balanced: 1/4"]


def test_a_moe_run_resumes_bitwise(moe_run, data_dir, tmp_path, monkeypatch):
    import signal

    from gpt_interventions import loader
    out = str(tmp_path / "run")
    batch = loader.TrainLoader.batch

    def preempt(self, s, micro):  # SIGTERM during step 6: checkpoint after it and stop
        if s == 5 and micro == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch(self, s, micro)
    monkeypatch.setattr(loader.TrainLoader, "batch", preempt)
    train.main(tiny_flags(data_dir, out, **EXACT, **MOE))
    monkeypatch.undo()
    assert read_metrics(out)[-1]["step"] == 6
    train.main(tiny_flags(data_dir, out, resume=True, **EXACT, **MOE))
    assert_same_run(moe_run, out)
    assert [r[ROUTING] for r in read_metrics(out) if "loss" in r] == \
        [r[ROUTING] for r in read_metrics(moe_run) if "loss" in r]


def test_the_aux_coefficient_changes_the_run_and_evaluation_is_pure_cross_entropy(moe_run, data_dir, tmp_path,
                                                                                   capsys):
    other = str(tmp_path / "no-aux")
    # one step: its loss is taken before any update, so it is the first step of the run without the term
    train.main(tiny_flags(data_dir, other, **{**EXACT, **MOE, "moe_aux_loss": 0.0, "max_iters": 1, "warmup_iters": 0,
                                              "charts": False}))
    first = [r["loss"] for r in read_metrics(other) if "loss" in r][0]
    first_aux = [r["loss"] for r in read_metrics(moe_run) if "loss" in r][0]
    assert 0.01 * 1.0 <= first_aux - first < 0.01 * 4  # the same weights: + 0.01 x a balancing loss in [1, 4)
    ckpt = os.path.join(moe_run, "ckpt.pt")
    capsys.readouterr()
    eval_py.main([ckpt, f"--data_dir={data_dir}", "--dataset=syn", "--split=val", "--eval_tokens=1024",
                  "--ledger=", "--json"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, _ = load_model(ckpt)
    x, y = read_windows(eval_windows(find_shards(data_dir, "syn", "val"), 32, 1024), 32, 256)
    with torch.no_grad():
        logits, _ = model.eval()(torch.from_numpy(x))
    ce = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), torch.from_numpy(y).flatten())
    assert row["loss"] == pytest.approx(ce.item(), rel=1e-6)
    val = [r["val_loss"] for r in read_metrics(moe_run) if "val_loss" in r][-1]
    assert row["loss"] == pytest.approx(val, rel=1e-6)  # the run's last validation: the same tokens


@pytest.mark.parametrize("flag, fmt", [("--export_hf", "the Hugging Face GPT-2 format"),
                                       ("--export_book", "the book's format")])
def test_exports_refuse_a_mixture_of_experts_in_one_line(moe_run, tmp_path, capsys, flag, fmt):
    out = tmp_path / "export"
    code, err = cli(eval_py.main, [os.path.join(moe_run, "ckpt.pt"), f"{flag}={out}"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {fmt} cannot hold this model: n_expert=4 (a mixture of experts)")
    assert not out.exists()


def test_bad_expert_flags_are_refused_in_one_line(data_dir, tmp_path, capsys):
    for flags, message in [(dict(n_expert=4, expert_top_k=5), "--expert_top_k must be from 1 to n_expert (4), got 5"),
                           (dict(n_expert=2, expert_top_k=0), "--expert_top_k must be from 1 to n_expert (2), got 0"),
                           (dict(n_expert=10**9), "--n_expert 1000000000 is more than 256")]:
        out = tmp_path / "run"
        code, err = cli(train.main, tiny_flags(data_dir, str(out), **flags), capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not out.exists()


def test_flops_per_token_counts_the_experts_a_token_uses():
    with torch.device("meta"):
        dense, moe = GPT(tiny()), GPT(tiny(n_expert=4, expert_top_k=2))
    expert = 16 * 64 + 64 + 64 * 16 + 16  # c_fc and c_proj with biases
    router = 16 * 4
    assert moe.num_params() == dense.num_params() + 2 * (3 * expert + router)  # every expert counted
    matmuls = 16 * 64 + 64 * 16  # FLOPs count the weights of matmuls, not the biases
    assert moe.flops_per_token() == dense.flops_per_token() + 6 * 2 * (matmuls + router)  # 2 of 4 used


def test_generate_runs_through_the_experts(moe_run):
    model, _ = load_model(os.path.join(moe_run, "ckpt.pt"))
    out = model.eval().generate(torch.tensor([[1, 2, 3]]), 5, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 8) and np.all(out[0, :3].numpy() == [1, 2, 3])
