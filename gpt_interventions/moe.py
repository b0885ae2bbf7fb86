"""Mixture of experts: a block's MLP replaced by n_expert MLPs and a router that sends each token
to its top-k of them (GPTConfig n_expert, expert_top_k, moe_impl, moe_draws; TrainConfig
moe_aux_loss; interventions.md, "Mixture of experts").

Each expert is the block's own MLP class, passed in by model.py, so every MLP variant is an
expert without code here. moe_impl=sparse (the default) runs each expert on the tokens routed to
it, k MLPs of work per token; moe_impl=dense runs every expert on every token and multiplies the
outputs of the experts a token was not routed to by a zero gate, n_expert MLPs per token but
static shapes. Both compute the same function (equal up to float rounding, tests/test_moe_sparse.py)
and both give every parameter a gradient. No capacity factor: no token is ever dropped.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_interventions.loader import read_windows


def route(logits, k):
    """Router logits (N, E) -> (gates (N, E), probs (N, E), chosen (N, k) expert ids).

    probs: the softmax over experts, in float32 (Switch Transformer's selective precision: the
    router's softmax is where low precision hurts). chosen: each token's k most probable experts.
    gates: zero except on the chosen experts, which get their probability (k = 1, as the Switch
    Transformer) or their probabilities renormalised to sum to 1 (k > 1, as GShard and Mixtral):
    renormalised, a single gate would always be 1.0 and the router would learn nothing from the
    language-model loss. With one expert either way the gate is exactly 1.0.
    """
    probs = logits.float().softmax(dim=-1)
    top, chosen = probs.topk(k, dim=-1)  # (N, k)
    if k > 1:
        top = top / top.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, chosen, top), probs, chosen


def assignment_fractions(chosen, n_expert):
    """(E,) the fraction of the N*k token-to-expert assignments in chosen (N, k) that each expert
    got: sums to 1, 1/E each when the load is balanced."""
    return F.one_hot(chosen, n_expert).float().flatten(0, 1).mean(dim=0)


def balance_loss(probs, chosen):
    """Switch Transformer's load-balancing loss (Fedus et al. 2021, eq. 4 without its alpha):
    E * sum_i f_i * P_i, f_i expert i's fraction of the assignments, P_i its mean router
    probability. 1 when routing is uniform, up to E when every token goes to one expert. The
    gradient reaches the router through P only (f counts discrete choices)."""
    n_expert = probs.size(-1)
    return n_expert * (assignment_fractions(chosen, n_expert) * probs.mean(dim=0)).sum()


class MoE(nn.Module):
    """x (B, T, C) -> (y (B, T, C), balancing loss): sum over each token's top-k experts of gate * expert(x).

    Parameter names: router (Linear C -> E, no bias) and experts.N.<the MLP's own names>.
    """

    def __init__(self, config, expert):
        super().__init__()
        self.n_expert, self.top_k, self.impl = config.n_expert, config.expert_top_k, config.moe_impl
        self.experts = nn.ModuleList([expert(config) for _ in range(config.n_expert)])
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)

    def forward(self, x, keys=None):
        """keys: the sequences' dropout keys (B, 2) or None; each expert drops by its tokens' keys."""
        h = x.flatten(0, 1)  # (N, C) tokens
        gates, probs, chosen = route(self.router(h), self.top_k)  # (N, E), (N, E), (N, k)
        tokens = token_keys(keys, x.shape)
        y = self.sparse(h, gates, chosen, tokens) if self.impl == "sparse" else self.dense(h, gates, tokens)
        return y.view_as(x), balance_loss(probs, chosen)

    def dense(self, h, gates, tokens=None):
        """h (N, C) -> (N, C): every expert on every token, a zero gate where it was not chosen."""
        y = gates[:, :1] * self.experts[0](h, tokens)
        for e in range(1, self.n_expert):
            y = y + gates[:, e:e + 1] * self.experts[e](h, tokens)
        return y

    def sparse(self, h, gates, chosen, tokens=None):
        """h (N, C) -> (N, C): each expert on the tokens routed to it, what dense computes.

        The N*k (token, expert) pairs are grouped by expert with a stable sort, each expert runs on
        its slice, and each token's k weighted outputs go back to their pairs and are summed in
        ascending expert order, the order in which dense adds them. Every expert runs, on no
        tokens if none chose it, so every parameter gets a gradient (zeros), as DDP needs. The
        slices' sizes are data: one host sync per layer, and under torch.compile unbacked
        symbolic sizes (step.wrap_model), one graph whatever the routing.
        """
        k = self.top_k
        chosen = chosen.sort(dim=-1).values  # (N, k) each token's experts in ascending order
        pairs = chosen.flatten()  # (N*k,) the expert of pair t*k + j: token t's j-th
        order = pairs.argsort(stable=True)  # (N*k,) pairs grouped by expert, tokens in order
        # tokens per expert; one_hot, not bincount, whose output shape torch.compile cannot know
        counts = F.one_hot(pairs, self.n_expert).sum(dim=0).tolist()
        rows = order // k  # (N*k,) the token of each grouped pair
        parts = h[rows].split(counts)  # each expert's tokens, (count_e, C)
        keys = [None] * self.n_expert if tokens is None else \
            zip(tokens[0][rows].split(counts), tokens[1][rows].split(counts))  # each part's tokens' keys
        out = torch.cat([expert(part, key) for expert, part, key in zip(self.experts, parts, keys)])  # (N*k, C)
        out = out * gates.gather(1, chosen).flatten()[order, None]
        y = torch.empty_like(out).index_copy(0, order, out)  # (N*k, C) back in pair order
        return y.view(-1, k, y.size(-1)).sum(dim=1)

    def drawn_late(self):
        """The modules whose initial weights are drawn after every other (model.py GPT._init_order):
        the router and experts 1..E-1, so that expert 0 draws what the dense MLP would have and
        switching MoE on moves no other weight's draw."""
        return [self.router, *(m for expert in self.experts[1:] for m in expert.modules())]


def token_keys(keys, shape):
    """Sequence keys (B, 2) of x (B, T, C) -> (each token's key (B*T, 2), the index of its first
    element in its sequence (B*T,)): an expert sees tokens, in any order, and drops each as the
    dense MLP drops it (gpt_interventions/dropout.py); None without keys."""
    if keys is None:
        return None
    B, T, C = shape
    return keys.repeat_interleave(T, dim=0), torch.arange(T, device=keys.device).repeat(B) * C


@torch.no_grad()
def routing_fractions(model, x):
    """Per MoE layer, each expert's fraction of the token assignments on tokens x (B, T): a list
    (layers) of lists (experts), each summing to 1. The model runs in eval mode (no dropout, so
    no random draw: the training run is untouched and a resumed run logs the same numbers)."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    logits = []
    hooks = [m.router.register_forward_hook(lambda _m, _in, out: logits.append(out)) for m in layers]
    was_training = model.training
    model.eval()
    try:
        model.body(x)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [assignment_fractions(route(z, m.top_k)[2], m.n_expert).tolist() for z, m in zip(logits, layers)]


def routing_batch(windows, config, rows, device):
    """The fixed tokens routing is measured on: the first `rows` validation windows, (rows, T) on
    device; None for a model without experts."""
    if not config.n_expert:
        return None
    x, _ = read_windows(windows[:rows], config.block_size, config.vocab_size)
    return torch.from_numpy(x).to(device)
