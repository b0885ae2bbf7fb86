"""GPT-2-shaped language model with the architecture interventions as config switches.

Parameter names follow GPT-2 (transformer.wte, wpe, h.N.attn.c_attn, c_proj, mlp.c_fc, ln_f,
lm_head) so that original GPT-2 weights map across by name.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_interventions.cli import field
from gpt_interventions.dropout import SequenceDropout, site_number
from gpt_interventions.moe import MoE


@dataclass
class GPTConfig:
    n_layer: int = field(12, "transformer blocks")
    n_head: int = field(12, "attention heads per block")
    n_embd: int = field(768, "model width")
    block_size: int = field(1024, "context length in tokens")
    vocab_size: int = field(50257, "vocabulary size (GPT-2 BPE: 50257)")
    dropout: float = field(0.1, "dropout on attention weights, residual branches and embeddings")
    qkv_bias: bool = field(False, "bias on the query/key/value projection only")
    tie_weights: bool = field(False, "share the token embedding with the output head")
    pad_vocab: bool = field(False, "pad embedding and head rows to a multiple of 64 (faster; adds parameters)")
    init: str = field("torch", "initial weights: torch (PyTorch's module defaults, as the book's and the "
                      "story's code) or gpt2 (N(0, 0.02), residual projections scaled, biases 0)",
                      choices=("torch", "gpt2"))
    # modern interventions (interventions.md, Modern interventions); each off by default
    position: str = field("learned", "position information: learned (GPT-2's wpe table) or rope (rotary "
                          "embeddings on queries and keys; no wpe)", choices=("learned", "rope"))
    rope_base: float = field(10000.0, "rotary base: the wavelengths run from 2*pi to about 2*pi*rope_base")
    norm: str = field("layernorm", "normalisation layers: layernorm (GPT-2) or rmsnorm (no centring, no bias)",
                      choices=("layernorm", "rmsnorm"))
    qk_norm: bool = field(False, "normalise each head's queries and keys (with --norm) before attention")
    mlp: str = field("gelu", "MLP: gelu (GPT-2, 4*n_embd wide), swiglu (gated, 8*ceil(n_embd/3) wide: about "
                     "the same parameters) or relu2 (ReLU squared)", choices=("gelu", "swiglu", "relu2"))
    bias: bool = field(True, "biases of the Linear layers other than QKV (see qkv_bias) and of the LayerNorms")
    logit_softcap: float = field(0.0, "cap the logits smoothly at +-this: cap*tanh(logits/cap); 0: off")
    zero_init_proj: bool = field(False, "start the attention and MLP output projections at zero (either init)")
    n_expert: int = field(0, "0: one MLP per block (GPT-2); N: a mixture of N experts, each that MLP, and a "
                          "router per block (gpt_interventions/moe.py)")
    expert_top_k: int = field(1, "experts each token is routed to, 1 to n_expert (with n_expert > 0)")
    moe_impl: str = field("sparse", "how the experts compute: sparse (each on the tokens routed to it: k MLPs "
                          "of work per token) or dense (each on every token, zero gates where not routed: "
                          "n_expert MLPs, static shapes); the same function up to rounding", choices=("sparse", "dense"))
    moe_draws: str = field("apart", "order of the experts' initial draws: apart (the router and experts 1.. "
                           "after every other weight, so n_expert moves no other weight's draw) or story "
                           "(each block's router then its experts in the MLP's place, as the story's code "
                           "builds them: his expert runs' initial weights at his seed)", choices=("apart", "story"))
    parametrization: str = field("standard", "standard, or mup: hyperparameters that transfer across width "
                                 "(muP, arXiv 2203.03466): at n_embd = m x mup_base_width the hidden matrices' "
                                 "gpt2 init std and AdamW lr are divided by sqrt(m) and m, the logits by m, "
                                 "attention scores are q.k x 8/head_size", choices=("standard", "mup"))
    mup_base_width: int = field(256, "the width at which mup equals standard (with 64-wide heads): tune there")

    @property
    def padded_vocab(self):
        """Rows of wte and lm_head: vocab_size, or rounded up to 64 (50257 -> 50304) for aligned matmuls."""
        return -(-self.vocab_size // 64) * 64 if self.pad_vocab else self.vocab_size

    @property
    def mlp_hidden(self):
        """MLP width: 4*n_embd, or for SwiGLU's three matrices 8*n_embd/3 rounded up to a multiple of 8,
        so that 3*C*h exceeds GELU's 8*C^2 weights by at most 16*C, a fraction 2/C (3% at C = 32,
        exactly 8*C^2 at 768: h = 2048)."""
        return 8 * -(-self.n_embd // 3) if self.mlp == "swiglu" else 4 * self.n_embd

    @property
    def width_mult(self):
        """muP's width ratio m = n_embd / mup_base_width; None under the standard parametrization."""
        return self.n_embd / self.mup_base_width if self.parametrization == "mup" else None


def make_norm(config, dim):
    """LayerNorm (GPT-2's, eps 1e-5, its bias switched by `bias`) or RMSNorm with the same eps: an
    explicit one, since nn.RMSNorm's default eps is the input dtype's (7.8e-3 in bfloat16)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-5)
    return nn.LayerNorm(dim, bias=config.bias)


def rotary(positions, head_size, base):
    """(cos, sin), each (T, head_size/2), of the rotary angles positions * base^(-2i/head_size)."""
    inv_freq = base ** -(torch.arange(0, head_size, 2, dtype=torch.float32, device=positions.device) / head_size)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate x (..., T, hs) in the planes of dims (i, i + hs/2) by the angles of (cos, sin): a
    query at position m and a key at n then meet through the rotation by (n - m) alone."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        # query, key, value for all heads in one matmul; qkv_bias switches only this bias
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE = True
        self.attn_dropout = SequenceDropout(config.dropout)  # on the attention probabilities
        self.resid_dropout = SequenceDropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        if config.qk_norm:  # over each head's hs dims, one set of gains shared by the heads
            self.q_norm = make_norm(config, config.n_embd // config.n_head)
            self.k_norm = make_norm(config, config.n_embd // config.n_head)
        self.qk_norm = config.qk_norm
        # muP: q.k / d_head, not / sqrt(d_head) (arXiv 2203.03466 sec. 4), times 8 so that it equals
        # the standard scale at GPT-2's 64-wide heads; None: SDPA's own 1/sqrt(d_head)
        self.scale = 8 / (config.n_embd // config.n_head) if config.parametrization == "mup" else None

    def forward(self, x, rope=None, keys=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # (cos, sin) of positions 0..T-1
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if keys is not None and self.training and self.dropout > 0:
            y = self.attention(q, k, v, keys)  # keyed masks: SDPA's dropout takes no mask
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y), keys)

    def attention(self, q, k, v, keys):
        """Causal attention computed explicitly (as the book's code computes it), with dropout on
        the probabilities keyed per sequence: (B, nh, T, hs) each -> (B, nh, T, hs)."""
        T = q.size(-2)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.size(-1))  # SDPA's default
        att = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        att = att.masked_fill(causal, float("-inf")).softmax(dim=-1)
        return self.attn_dropout(att, keys).to(v.dtype) @ v


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h = config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, h, bias=config.bias)
        if config.mlp == "swiglu":  # SwiGLU: c_proj(silu(c_gate(x)) * c_fc(x))
            self.c_gate = nn.Linear(config.n_embd, h, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(h, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE = True
        self.dropout = SequenceDropout(config.dropout)
        self.kind = config.mlp

    def forward(self, x, keys=None):
        """x (B, T, C), or (B*T, C) rows in sequence order (an expert's), -> the same shape."""
        if self.kind == "swiglu":
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        elif self.kind == "relu2":
            h = F.relu(self.c_fc(x)).square()
        else:
            h = self.gelu(self.c_fc(x))
        return self.dropout(self.c_proj(h), keys)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MoE(config, MLP) if config.n_expert else MLP(config)

    def forward(self, x, rope=None, keys=None):
        """x (B, T, C) -> (x, the MoE balancing loss of this block, or None with a dense MLP);
        keys: the sequences' dropout keys (gpt_interventions/dropout.py), or None."""
        x = x + self.attn(self.ln_1(x), rope, keys)
        if isinstance(self.mlp, MoE):
            y, balance = self.mlp(self.ln_2(x), keys)
            return x + y, balance
        return x + self.mlp(self.ln_2(x), keys), None


def matmul_weights(module):
    """Entries of the Linear weights in module: each is one multiply-add per token forward."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
        if config.position == "rope" and config.n_embd // config.n_head % 2:
            raise ValueError(f"rope needs an even head size, not {config.n_embd // config.n_head}")
        if config.n_expert and not 1 <= config.expert_top_k <= config.n_expert:
            raise ValueError(f"expert_top_k {config.expert_top_k} is not in 1..n_expert ({config.n_expert})")
        self.config = config
        # Construction draws from the RNG (nn.Linear's own init, more of it with qkv_bias); rewind
        # so that the init below draws the same numbers whatever the switches: turning qkv_bias or
        # tie_weights on changes only the parameters it adds or removes, not the others.
        rng = torch.get_rng_state()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=SequenceDropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab, bias=False)
        torch.set_rng_state(rng)
        if config.init == "gpt2":
            for module in sum(self._init_order(), []):
                self._init_gpt2(module)
        else:
            self._init_torch()
        if config.tie_weights:  # the head was drawn too, so tying changes no other weight's draw
            self.lm_head.weight = self.transformer.wte.weight  # one tensor, two names: wte's init
        if config.position == "rope":  # wpe was drawn too, so rope changes no other weight's draw
            del self.transformer.wpe
        for name, module in self.named_modules():
            if isinstance(module, SequenceDropout):
                module.site = site_number(name)
        if config.zero_init_proj:  # drawn, then zeroed: no other weight's draw moves
            for proj in self.modules():  # attn.c_proj and mlp.c_proj (every expert's, with n_expert)
                if getattr(proj, "RESIDUAL_SCALE", False):
                    for p in proj.parameters():
                        p.detach().zero_()

    @torch.no_grad()
    def _init_torch(self):
        """PyTorch's module defaults, which the book's GPTModel (and so the story's code) keeps:
        Embedding N(0, 1); Linear weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)); LayerNorm 1, 0.

        Drawn module by module, the head included (a tied head is then replaced by wte), then the
        QKV biases, then the modules experts add (_init_order): no switch moves another weight's
        draw (absent biases, and absent QKV biases before experts, are drawn and dropped; the head
        and routers never have one). The book's W_query/W_key/W_value have our c_attn's fan_in.
        """
        qkv = [block.attn.c_attn for block in self.transformer.h]
        # no bias drawn here: the QKV biases (below) and the Linears no switch gives a bias
        no_bias = set(map(id, qkv + [self.lm_head] + [b.mlp.router for b in self.transformer.h
                                                      if isinstance(b.mlp, MoE)]))
        first, late = self._init_order()
        for module in first:
            self._draw_torch(module, no_bias)
        for module in qkv:
            bias = module.bias if module.bias is not None else torch.empty(module.out_features) if late else None
            if bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                bias.uniform_(-bound, bound)
        for module in late:
            self._draw_torch(module, no_bias)

    def _draw_torch(self, module, no_bias):
        """Draw one module's own weights as PyTorch's defaults do (_init_torch); no bias for the
        modules whose ids are in no_bias."""
        if isinstance(module, nn.Embedding):
            self._rows(module).normal_(0.0, 1.0)
        elif isinstance(module, nn.Linear):
            bound = 1 / math.sqrt(module.in_features)
            self._rows(module).uniform_(-bound, bound)
            if id(module) in no_bias:
                return
            bias = module.bias if module.bias is not None else torch.empty(module.out_features)
            bias.uniform_(-bound, bound)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()

    def _init_order(self):
        """(modules drawn first, modules drawn last), together every module once. moe_draws=apart: as
        self.modules(), except that a mixture of experts' router and experts after the first are
        drawn last (MoE.drawn_late), so that n_expert changes no other weight's draw. story: as
        self.modules() with each router just before its experts, nothing last: the story's code
        builds the router and then the experts where the MLP was (interventions.md)."""
        mixtures = [block.mlp for block in self.transformer.h if isinstance(block.mlp, MoE)]
        if self.config.moe_draws == "story":
            routers = set(id(m.router) for m in mixtures)
            order = [m for m in self.modules() if id(m) not in routers]
            for moe in mixtures:
                order.insert(order.index(moe) + 1, moe.router)
            return order, []
        late = [m for moe in mixtures for m in moe.drawn_late()]
        skip = set(map(id, late))
        return [m for m in self.modules() if id(m) not in skip], late

    @torch.no_grad()
    def _rows(self, module):
        """The rows of a weight that the RNG fills: pad_vocab's extra rows of wte and lm_head start at
        zero and draw nothing, so padding leaves every other initial weight as it was (and those
        rows are never used)."""
        weight = module.weight
        if module is self.transformer.wte or module is self.lm_head:
            weight.zero_()
            weight = weight[: self.config.vocab_size]
        return weight

    def _init_gpt2(self, module):
        # GPT-2 init: N(0, 0.02); residual projections scaled by 1/sqrt(2 * n_layer); biases 0
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE", False):
                std /= math.sqrt(2 * self.config.n_layer)
            if self.config.width_mult and isinstance(module, nn.Linear) and self._hidden(module):
                std /= math.sqrt(self.config.width_mult)  # muP: hidden weights' variance ~ 1/fan_in
            torch.nn.init.normal_(self._rows(module), mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            torch.nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)

    def _hidden(self, module):
        """A Linear inside the blocks: muP's hidden matrices (fan_in and fan_out grow with width). The
        torch init's U(+-1/sqrt(fan_in)) already scales them as muP does; the gpt2 init's N(0, 0.02)
        does not, so _init_gpt2 divides its std by sqrt(width_mult)."""
        return any(module is m for m in self.transformer.h.modules())

    def num_params(self):
        """Every parameter counted once (a tied head is not counted twice), embeddings included;
        every expert counted (flops_per_token counts the matmuls a token goes through)."""
        return sum(p.numel() for p in self.parameters())

    def body(self, idx):
        """idx (B, T) token ids -> final hidden states (B, T, C): everything but the output head."""
        return self.trunk(idx)[0]

    def trunk(self, idx, dropout_keys=None):
        """idx (B, T) -> (final hidden states (B, T, C), the MoE balancing loss averaged over the
        layers, or None without experts). dropout_keys (B, 2): each sequence's dropout key
        (gpt_interventions/dropout.py); None: torch's dropout from the global generator."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x, rope = self.transformer.wte(idx), None  # (B, T, C)
        if self.config.position == "rope":
            rope = rotary(pos, self.config.n_embd // self.config.n_head, self.config.rope_base)
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x, dropout_keys)
        balance = []
        for block in self.transformer.h:
            x, b = block(x, rope, dropout_keys)
            if b is not None:
                balance.append(b)
        return self.transformer.ln_f(x), torch.stack(balance).mean() if balance else None

    def softcap(self, logits):
        """The head's output -> logits: under mup divided by width_mult (muP's output multiplier, so
        that the head's AdamW lr needs no width rule); then logit_softcap: cap * tanh(logits / cap)
        in float32, so that |logits| < cap; identity if 0."""
        if self.config.width_mult:
            logits = logits / self.config.width_mult
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits.float() / cap) if cap else logits

    def forward(self, idx, targets=None, z_loss=0.0, moe_aux_loss=0.0, dropout_keys=None):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets, loss = mean cross-entropy, plus
        z_loss * mean(logsumexp(logits)^2) (PaLM's z-loss) and moe_aux_loss * the experts' balancing
        loss (with n_expert > 0) when they are > 0: the training objective. dropout_keys: see trunk."""
        h, balance = self.trunk(idx, dropout_keys)
        logits = self.softcap(self.lm_head(h))  # (B, T, padded_vocab)
        if self.config.pad_vocab:
            logits = logits[..., : self.config.vocab_size]  # padded ids are never predicted
        loss = None
        if targets is not None:
            flat = logits.float().view(-1, logits.size(-1))
            loss = F.cross_entropy(flat, targets.view(-1))
            if z_loss:
                loss = loss + z_loss * torch.logsumexp(flat, dim=-1).square().mean()
            if moe_aux_loss and balance is not None:
                loss = loss + moe_aux_loss * balance
        return logits, loss

    @torch.no_grad()
    def nll_sum(self, idx, targets, chunk=2**19):
        """Summed cross-entropy (float64) of targets (B, T), never holding the (B, T, vocab) logits.

        The head runs on blocks of tokens and slices of the vocabulary, about `chunk` logits at a
        time, keeping a running logsumexp and picking each target's logit from the slice that
        holds it. On a CPU a cache-sized chunk (2**19 floats, 2 MB) scores 1.3-2x faster than one
        (B*T, vocab) logits tensor written to memory and read back by log_softmax (BENCHMARKS.md);
        on a GPU a large chunk keeps the kernels few and bounds the memory. Per-token losses are
        summed in float64. Equal to cross_entropy(forward(idx)[0], targets, reduction="sum") up
        to float rounding (tests/test_model.py). Every target must be an id below vocab_size:
        there is no ignore_index (loader.read_windows checks the ids).
        """
        h = self.body(idx).flatten(0, 1)  # (N, C)
        y = targets.flatten()  # (N,)
        weight = self.lm_head.weight[: self.config.vocab_size]  # pad_vocab's rows are never predicted
        block = max(1, min(h.size(0), chunk // 512))  # tokens per block: slices of at least 512 columns
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        for s in range(0, h.size(0), block):
            hb, yb = h[s:s + block], y[s:s + block]
            cols = max(1, chunk // hb.size(0))
            lse = torch.full(yb.shape, -math.inf, device=h.device)
            target = torch.zeros(yb.shape, device=h.device)
            for v in range(0, weight.size(0), cols):
                logits = self.softcap(F.linear(hb, weight[v:v + cols]).float())  # (block, cols)
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
                j = yb - v  # target's column in this slice, if it is here
                here = (j >= 0) & (j < logits.size(1))
                picked = logits.gather(1, j.clamp(0, logits.size(1) - 1).unsqueeze(1)).squeeze(1)
                target = torch.where(here, picked, target)
            total += (lse - target).double().sum()
        return total

    def flops_per_token(self):
        """Training FLOPs per token: 6 per matmul weight a token meets (2 forward, 4 backward) plus
        12*L*H*Q*T for attention's two T x T matmuls (PaLM). Matmuls only: the token and position
        embeddings are lookups (a tied head is still a matmul, counted as the head), and biases,
        norms and activations are not counted. With experts, the top_k experts a token is routed
        to (and the router), not the ones the dense computation runs for nothing."""
        c = self.config
        n = matmul_weights(self)
        for block in self.transformer.h:
            if isinstance(block.mlp, MoE):
                n -= (c.n_expert - c.expert_top_k) * matmul_weights(block.mlp.experts[0])
        return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample continuations of idx (B, T); returns (B, T + max_new_tokens)."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].double()  # float64: a temperature of 1e-300 does not round to 0
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                # shift first: a tiny temperature then gives -inf, never inf - inf = nan
                logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
