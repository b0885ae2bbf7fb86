"""Mixture of experts: a block's MLP replaced by n_expert MLPs and a router that sends each token
to its top-k of them (GPTConfig n_expert, expert_top_k; TrainConfig moe_aux_loss; interventions.md,
"Mixture of experts").

Each expert is the block's own MLP class, passed in by model.py, so every MLP variant is an
expert without code here. The computation is dense: every expert runs on every token and the
outputs of the experts a token was not routed to are multiplied by a zero gate. That keeps the
shapes static (no data-dependent control flow: torch.compile and DDP see one graph, every
parameter gets a gradient) and is exact, at the cost of n_expert MLPs per token where a sparse
dispatch computes k. No capacity factor: no token is ever dropped.
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
        self.n_expert, self.top_k = config.n_expert, config.expert_top_k
        self.experts = nn.ModuleList([expert(config) for _ in range(config.n_expert)])
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)

    def forward(self, x, keys=None):
        h = x.flatten(0, 1)  # (N, C) tokens, each sequence's T in a row (the experts' dropout keys them so)
        gates, probs, chosen = route(self.router(h), self.top_k)  # (N, E), (N, E), (N, k)
        y = gates[:, :1] * self.experts[0](h, keys)  # dense: every expert on every token, zero gate if not chosen
        for e in range(1, self.n_expert):
            y = y + gates[:, e:e + 1] * self.experts[e](h, keys)
        return y.view_as(x), balance_loss(probs, chosen)

    def drawn_late(self):
        """The modules whose initial weights are drawn after every other (model.py GPT._init_order):
        the router and experts 1..E-1, so that expert 0 draws what the dense MLP would have and
        switching MoE on moves no other weight's draw."""
        return [self.router, *(m for expert in self.experts[1:] for m in expert.modules())]


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
