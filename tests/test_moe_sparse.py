"""moe_impl=sparse (gpt_interventions/moe.py, MoE.sparse): each expert computing only the tokens
routed to it gives what the dense experts give (the same routing, outputs and gradients equal up
to float32 rounding), gives every parameter a gradient under DDP even where a rank routes no token
to an expert, compiles to one graph without recompiles, and trains a run that resumes bitwise
(tests/test_moe.py) and matches the dense run."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import train
from gpt_interventions.checkpoint import load_checkpoint
from gpt_interventions.moe import MoE, route
from gpt_interventions.resolve import known_fields
from gpt_interventions.step import wrap_model
from gpt_interventions.training import TrainConfig
from helpers import curve, tiny_flags
from model import GPT, MLP, GPTConfig

# float32: the experts' matmuls see other row counts, so their sums may round otherwise
TOL = dict(rtol=1e-5, atol=1e-6)


def config(**kw):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50, dropout=0.0), **kw})


def pair(seed=0, **kw):
    """(sparse, dense): two MoE layers holding the same weights, the router's spread wide."""
    torch.manual_seed(seed)
    sparse = MoE(config(moe_impl="sparse", **kw), MLP)
    with torch.no_grad():
        sparse.router.weight.normal_(0, 1.0)
    dense = MoE(config(moe_impl="dense", **kw), MLP)
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


def grads(module, x, y, balance, weights):
    loss = (y * weights).sum() + balance
    return torch.autograd.grad(loss, [x, *module.parameters()])


@pytest.mark.parametrize("mlp", ["gelu", "swiglu", "relu2"])
@pytest.mark.parametrize("n_expert, k", [(6, 2), (8, 2), (5, 1), (5, 3), (4, 4)])
def test_sparse_computes_the_dense_experts_outputs_and_gradients(n_expert, k, mlp):
    sparse, dense = pair(n_expert=n_expert, expert_top_k=k, mlp=mlp)
    x = torch.randn(4, 8, 16, requires_grad=True)
    weights = torch.randn(4, 8, 16)
    ys, bs = sparse(x)
    yd, bd = dense(x)
    assert torch.equal(bs, bd)  # the same routing: the same router and route()
    torch.testing.assert_close(ys, yd, **TOL)
    for gs, gd in zip(grads(sparse, x, ys, bs, weights), grads(dense, x, yd, bd, weights)):
        torch.testing.assert_close(gs, gd, **TOL)


def test_an_expert_no_token_chose_gets_zero_gradients_as_in_dense():
    sparse, dense = pair(n_expert=4, expert_top_k=2)
    with torch.no_grad():
        for moe in (sparse, dense):
            moe.router.weight[3] = -10.0  # positive inputs: expert 3's logit is always the lowest
    x = (torch.rand(2, 8, 16) + 0.1).requires_grad_()
    assert not (route(sparse.router(x.flatten(0, 1)), 2)[2] == 3).any()
    ys, bs = sparse(x)
    yd, bd = dense(x)
    weights = torch.randn(2, 8, 16)
    names = [n for n, _ in sparse.named_parameters()]
    for name, gs, gd in zip(["x"] + names, grads(sparse, x, ys, bs, weights), grads(dense, x, yd, bd, weights)):
        torch.testing.assert_close(gs, gd, **TOL)
        if name.startswith("experts.3."):
            assert not gs.any(), name


@pytest.mark.parametrize("init", ["torch", "gpt2"])
def test_the_whole_model_scores_and_learns_the_same_either_way(init):
    torch.manual_seed(0)
    sparse = GPT(config(init=init, n_expert=6, expert_top_k=2))
    dense = GPT(config(init=init, n_expert=6, expert_top_k=2, moe_impl="dense"))
    dense.load_state_dict(sparse.state_dict())
    idx = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    logits_s, loss_s = sparse(idx, idx, moe_aux_loss=0.01)
    logits_d, loss_d = dense(idx, idx, moe_aux_loss=0.01)
    torch.testing.assert_close(logits_s, logits_d, **TOL)
    torch.testing.assert_close(loss_s, loss_d, **TOL)
    for gs, gd in zip(torch.autograd.grad(loss_s, list(sparse.parameters())),
                      torch.autograd.grad(loss_d, list(dense.parameters()))):
        torch.testing.assert_close(gs, gd, **TOL)


def test_runs_saved_before_moe_impl_resume_with_the_dense_experts_they_trained_with():
    saved = {k: v for k, v in vars(config(n_expert=4)).items() if k != "moe_impl"}
    mc, _ = known_fields(saved, vars(TrainConfig()))
    assert mc.moe_impl == "dense" and GPTConfig().moe_impl == "sparse"


def test_a_sparse_run_trains_as_the_dense_run(data_dir, tmp_path):
    flags = dict(n_expert=4, expert_top_k=2, moe_aux_loss=0.01, max_iters=4, eval_interval=0, charts=False)
    for impl in ("sparse", "dense"):
        train.main(tiny_flags(data_dir, str(tmp_path / impl), moe_impl=impl, **flags))
    for a, b in zip(curve(tmp_path / "sparse"), curve(tmp_path / "dense")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    ws, wd = (load_checkpoint(str(tmp_path / impl / "ckpt.pt"))["model"] for impl in ("sparse", "dense"))
    for name in ws:
        torch.testing.assert_close(ws[name], wd[name], rtol=1e-4, atol=1e-6)


# --- torch.compile: one graph, no recompiles, whatever the routing --------------------------------


@pytest.mark.slow
def test_compiled_sparse_experts_are_one_graph_without_recompiles():
    # wrap_model sets capture_scalar_outputs; config.patch restores it after (monkeypatch's undo
    # would delattr it, which dynamo's config module takes as hiding the option for the process)
    with torch._dynamo.config.patch(capture_scalar_outputs=False):
        compiled_sparse_experts_are_one_graph_without_recompiles()


def compiled_sparse_experts_are_one_graph_without_recompiles():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = GPT(config(n_layer=1, n_expert=4, expert_top_k=2))
    compiled, _ = wrap_model(model, SimpleNamespace(compile=True), SimpleNamespace(world_size=1))
    for seed in range(3):  # three batches, three routings: other token counts per expert
        idx = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(seed))
        _, loss = compiled(idx, idx)
        got = torch.autograd.grad(loss, list(model.parameters()))
        _, eager_loss = model(idx, idx)
        torch.testing.assert_close(loss, eager_loss, **TOL)
        for g, e in zip(got, torch.autograd.grad(eager_loss, list(model.parameters()))):
            torch.testing.assert_close(g, e, **TOL)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["total"] == 1


# --- DDP: a rank that routes no token to an expert still gives it a gradient ------------------------


def ddp_inputs():
    """Rank 0's tokens go anywhere; rank 1's only to experts 0 and 1 (its inputs point along the
    router's first two rows and away from the others)."""
    g = torch.Generator().manual_seed(5)
    spread = torch.randn(3, 8, 16, generator=g)
    narrow = torch.randn(3, 8, 16, generator=g) * 0.1
    narrow[..., :2] += 3.0
    narrow[..., 2:4] -= 3.0
    return spread, narrow


def ddp_layer():
    torch.manual_seed(0)
    moe = MoE(config(n_expert=4, expert_top_k=2), MLP)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :4] = 5.0 * torch.eye(4)  # expert e's logit: 5 x input dimension e
    return moe


def ddp_rank(rank, store_path, out_path):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    moe = ddp_layer()
    ddp = DDP(moe)  # held: its hooks reduce the gradients; by default every parameter must get one
    y, balance = ddp(ddp_inputs()[rank])
    (y.square().sum() + balance).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in moe.named_parameters()}, out_path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gives_every_expert_its_gradient_when_a_rank_routes_it_no_token(tmp_path):
    moe = ddp_layer()
    spread, narrow = ddp_inputs()
    chosen = [route(moe.router(x.flatten(0, 1)), 2)[2] for x in (spread, narrow)]
    assert set(chosen[0].unique().tolist()) == {0, 1, 2, 3} and set(chosen[1].unique().tolist()) == {0, 1}
    out = str(tmp_path / "grads.pt")
    mp.spawn(ddp_rank, args=(str(tmp_path / "store"), out), nprocs=2)
    got = torch.load(out, weights_only=True)
    # the mean of the two ranks' gradients, here in one process
    for x in (spread, narrow):
        y, balance = moe(x)
        ((y.square().sum() + balance) / 2).backward()
    for name, p in moe.named_parameters():
        torch.testing.assert_close(got[name], p.grad, **TOL)
