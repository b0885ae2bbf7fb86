import hashlib
import math

import pytest
import torch

from model import GPT, GPTConfig


def gpt2_small(**kw):
    return GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, **kw)


def count_on_meta(config):
    with torch.device("meta"):
        return GPT(config).num_params()


def test_parameter_count_of_the_story_163m_shape():
    # untied head, no QKV bias: 124,439,808 + 50257*768 (head) - 12*3*768 (QKV biases)
    assert count_on_meta(gpt2_small(qkv_bias=False, tie_weights=False)) == 163_009_536


def test_parameter_count_of_original_gpt2_124m_shape():
    assert count_on_meta(gpt2_small(qkv_bias=True, tie_weights=True)) == 124_439_808


def test_qkv_bias_switches_only_the_qkv_bias():
    tiny = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    with_bias = {k for k, _ in GPT(GPTConfig(**tiny, qkv_bias=True)).named_parameters()}
    without = {k for k, _ in GPT(GPTConfig(**tiny, qkv_bias=False)).named_parameters()}
    assert with_bias - without == {"transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"}
    assert "transformer.h.0.attn.c_proj.bias" in without and "transformer.h.0.ln_1.bias" in without


def tiny(**kw):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, dropout=0.0), **kw})


def test_tied_weights_share_storage_and_untied_do_not():
    tied, untied = GPT(tiny(tie_weights=True)), GPT(tiny(tie_weights=False))
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()
    # a state-dict round trip keeps the tie
    again = GPT(tiny(tie_weights=True))
    again.load_state_dict(tied.state_dict())
    assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("init", ["torch", "gpt2"])
@pytest.mark.parametrize("switch", ["qkv_bias", "tie_weights"])
def test_switches_do_not_change_the_other_initial_weights(switch, init):
    torch.manual_seed(0)
    off = dict(GPT(tiny(init=init, **{switch: False})).named_parameters())
    torch.manual_seed(0)
    on = dict(GPT(tiny(init=init, **{switch: True})).named_parameters())
    shared = (set(off) & set(on)) - {"lm_head.weight"}
    assert len(shared) > 10
    for name in shared:
        assert torch.equal(off[name], on[name]), name


@pytest.mark.parametrize("init", ["torch", "gpt2"])
def test_pad_vocab_adds_zero_rows_and_changes_no_other_weight(init):
    torch.manual_seed(0)
    plain = dict(GPT(tiny(init=init, vocab_size=50)).named_parameters())
    torch.manual_seed(0)
    padded = dict(GPT(tiny(init=init, vocab_size=50, pad_vocab=True)).named_parameters())
    for name, p in plain.items():
        q = padded[name]
        if name in ("transformer.wte.weight", "lm_head.weight"):
            assert q.shape[0] == 64 and not q[50:].any(), name
            q = q[:50]
        assert torch.equal(p, q), name


def state_hash(model):
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("switches, digest", [
    (dict(), "97dfad7f1bab9fdd"),
    (dict(qkv_bias=True), "d9224201903a3d9a"),
    (dict(tie_weights=True, pad_vocab=True), "c281d38a128a2f6e")])
def test_gpt2_init_is_unchanged(switches, digest):
    # the digests of the weights the GPT-2 init drew before init=torch existed (commit 3a5a108)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50, init="gpt2", **switches))
    assert state_hash(model) == digest


def test_torch_init_is_pytorchs_module_defaults():
    # the book's GPTModel keeps PyTorch's defaults: Embedding N(0, 1); Linear weight and bias
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)); LayerNorm scale 1, shift 0
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=256, vocab_size=4000, qkv_bias=True))
    assert model.config.init == "torch"  # the default
    for name, p in model.named_parameters():
        p = p.detach().double()
        if name.endswith(("wte.weight", "wpe.weight")):
            assert abs(p.mean()) < 0.01 and p.std() == pytest.approx(1.0, abs=0.01), name
        elif ".ln_" in name or name.startswith("transformer.ln_f"):
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
        else:  # every Linear weight and bias, the QKV bias and the head included
            fan_in = 1024 if "mlp.c_proj" in name else 256
            bound = 1 / math.sqrt(fan_in)
            assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound, name
            assert p.std() == pytest.approx(bound / math.sqrt(3), rel=0.1 if p.dim() == 1 else 0.02), name


def test_torch_init_tied_head_is_the_embeddings_n01():
    # the story's weight-tying run: the head starts as wte's N(0, 1) rows, so initial logits have a
    # standard deviation of about sqrt(n_embd) (28 at 768; more where a row meets its own input
    # embedding) and the initial loss is hundreds of nats, against 1/sqrt(3) and about ln V untied
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 1000, (2, 64), generator=g), torch.randint(0, 1000, (2, 64), generator=g)
    losses = {}
    for tie, std, rel in ((True, math.sqrt(768), 0.25), (False, 1 / math.sqrt(3), 0.05)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_head=12, n_embd=768, block_size=64, vocab_size=1000, dropout=0.0,
                              tie_weights=tie))
        logits, losses[tie] = model(x, y)
        assert torch.equal(model.lm_head.weight, model.transformer.wte.weight) == tie
        assert logits.std().item() == pytest.approx(std, rel=rel)
    assert losses[True].item() > 50
    assert losses[False].item() == pytest.approx(math.log(1000) + 1 / 6, abs=0.1)  # ln V + var / 2


def test_causality_later_tokens_do_not_change_earlier_logits():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 32, (2, 8))
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 32
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_initial_loss_is_about_ln_vocab_with_the_gpt2_init():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=1000, n_embd=32, init="gpt2"))
    idx = torch.randint(0, 1000, (4, 8))
    _, loss = model(idx, idx)
    assert abs(loss.item() - math.log(1000)) < 0.05


def test_forward_rejects_sequences_longer_than_block_size():
    with pytest.raises(ValueError, match="block_size"):
        GPT(tiny())(torch.zeros(1, 9, dtype=torch.long))


def test_generate_is_seeded_and_keeps_the_prompt():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    prompt = torch.tensor([[1, 2, 3]])
    a = model.generate(prompt, 10, top_k=5, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 10, top_k=5, generator=torch.Generator().manual_seed(7))
    assert a.shape == (1, 13) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)


def test_flops_per_token_of_gpt2_small():
    # matmuls only: 12 layers x 12 x 768^2 (c_attn, c_proj, c_fc, mlp.c_proj) plus the head's
    # 50257 x 768, 6 FLOPs each, plus 12 * 12 layers * 12 heads * 64 * 1024 for attention. Tied or
    # untied the same: the untied wte is a lookup (counted before, 6 x 38.6M FLOPs too many).
    matmuls = 12 * 12 * 768 * 768 + 50257 * 768
    with torch.device("meta"):
        tied = GPT(gpt2_small(qkv_bias=True, tie_weights=True))
        untied = GPT(gpt2_small(qkv_bias=False, tie_weights=False))  # the story's 163M
    assert tied.flops_per_token() == untied.flops_per_token() == 6 * matmuls + 12 * 12 * 12 * 64 * 1024 == 854_438_400


def counted_flops_per_token(model, rows=2):
    """Training FLOPs per token as torch's FlopCounterMode counts the matmuls of one forward and
    backward (with the math attention, whose two matmuls it counts; the CPU's flash kernel it does
    not), less, with the dense mixture of experts, what it computes in the experts a token is not
    routed to: n_layer x (n_expert - top_k) x one expert's forward and backward, counted alike
    (the sparse mixture runs each expert on its tokens only, which the counter counts as it is)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    c = model.config
    x = torch.randint(0, c.vocab_size, (rows, c.block_size), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, x)[1].backward()
    per_token = counter.get_total_flops() / (rows * c.block_size)
    if c.n_expert and c.moe_impl == "dense":
        h = torch.randn(rows * c.block_size, c.n_embd, requires_grad=True)
        with FlopCounterMode(display=False) as expert:
            model.transformer.h[0].mlp.experts[0](h).sum().backward()
        per_token -= c.n_layer * (c.n_expert - c.expert_top_k) * expert.get_total_flops() / h.size(0)
    return per_token


@pytest.mark.parametrize("switches", [dict(), dict(tie_weights=True), dict(position="rope"), dict(pad_vocab=True),
                                      dict(qkv_bias=True, bias=False, mlp="swiglu"),
                                      dict(n_expert=4, expert_top_k=2), dict(n_expert=4, expert_top_k=2, moe_impl="dense"),
                                      dict(n_expert=3, expert_top_k=3, mlp="relu2")],
                         ids=["untied", "tied", "rope", "pad_vocab", "swiglu", "experts", "dense-experts", "all-experts"])
def test_flops_per_token_is_the_matmuls_a_flop_counter_counts(switches):
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=50, **switches))
    assert model.flops_per_token() == counted_flops_per_token(model)


# With 24 tokens and a vocabulary of 1000: chunk 1 gives one-column slices; 7 gives slices of 7
# (the last of 6); 1500 blocks of 2 tokens x slices of 750 (last 250); 3000 blocks of 5 tokens
# (the last of 4) x slices of 600 (last 400); 2**19 one block and one slice.
@pytest.mark.parametrize("chunk", [1, 7, 1500, 3000, 2**19])
@pytest.mark.parametrize("pad_vocab", [False, True])
@pytest.mark.numerics
def test_nll_sum_equals_cross_entropy_of_the_full_logits(chunk, pad_vocab):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=1000, pad_vocab=pad_vocab)
    model = GPT(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # spread the logits so that every slice matters
    idx = torch.randint(0, 1000, (3, 8))
    targets = torch.randint(0, 1000, (3, 8))
    targets[0] = torch.tensor([0, 6, 7, 599, 600, 749, 750, 999])  # first, last and slice edges
    with torch.no_grad():
        logits, _ = model(idx)
        expected = torch.nn.functional.cross_entropy(logits.double().view(-1, 1000), targets.view(-1),
                                                     reduction="sum")
        got = model.nll_sum(idx, targets, chunk)
    assert got.dtype == torch.float64
    # float32 logsumexp carried over up to 1000 slices: rounding ~1e-6; a wrong target is ~1e-2
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.numerics
def test_nll_sum_under_bfloat16_autocast_matches_the_bfloat16_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=101)).eval()
    idx, targets = torch.randint(0, 101, (2, 8)), torch.randint(0, 101, (2, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(idx)
        got = model.nll_sum(idx, targets, 64)
    assert logits.dtype == torch.bfloat16
    expected = torch.nn.functional.cross_entropy(logits.double().view(-1, 101), targets.view(-1), reduction="sum")
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
