"""The optimizer: AdamW over parameter groups that hold every parameter exactly once, or Muon for
the hidden matrices with AdamW for the rest (--optimizer=muon), as one torch.optim.Optimizer.

Every group carries its own peak learning rate, `peak_lr`: train.py's loop sets each group's lr
from it by the one schedule (gpt_interventions/schedule.py get_lr).
"""

import torch

HIDDEN = "transformer.h."  # the blocks: their 2-D weights are Muon's under --optimizer=muon


def configure_optimizer(model, tc, device_type):
    """AdamW with a decay and a no-decay group, and with --optimizer=muon a Muon group of the
    hidden matrices first taken out of them; every parameter in exactly one group."""
    params = dict(model.named_parameters())  # a tied weight appears once, under its first name
    muon = [p for name, p in params.items() if tc.optimizer == "muon" and is_hidden_matrix(name, p)]
    taken = set(map(id, muon))
    rest = [p for p in params.values() if id(p) not in taken]
    if tc.decay_params == "all":
        decay, no_decay = rest, []
    else:  # matrices (Linear weights, embeddings) decay; biases and LayerNorm gains do not
        decay = [p for p in rest if p.dim() >= 2]
        no_decay = [p for p in rest if p.dim() < 2]
    ids = [id(p) for p in muon + decay + no_decay]
    assert len(ids) == len(set(ids)) == len(params), "each parameter must be optimised exactly once"
    groups = [{"params": decay, "weight_decay": tc.weight_decay, "peak_lr": tc.learning_rate},
              {"params": no_decay, "weight_decay": 0.0, "peak_lr": tc.learning_rate}]
    m = model.config.width_mult
    if m:  # muP for Adam (arXiv 2203.03466, Table 3): the hidden matrices' lr ~ 1/fan_in, so lr / m
        hidden = {id(p) for name, p in params.items() if is_hidden_matrix(name, p)}
        groups.insert(0, {"params": [p for p in decay if id(p) in hidden], "weight_decay": tc.weight_decay,
                          "peak_lr": tc.learning_rate / m, "lr": tc.learning_rate / m})
        groups[1]["params"] = [p for p in decay if id(p) not in hidden]
    adamw = torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                              fused=device_type == "cuda")
    if tc.optimizer == "adamw":
        return adamw
    return MuonAdamW(adamw, torch.optim.Muon(
        [{"params": muon, "peak_lr": tc.muon_lr}], lr=tc.muon_lr, weight_decay=tc.muon_weight_decay,
        momentum=tc.muon_momentum, adjust_lr_fn=tc.muon_adjust_lr))


def is_hidden_matrix(name, p):
    """Muon's parameters: the 2-D weights inside the transformer blocks (attention and MLP
    projections, and any other 2-D block weight). Embeddings, the head, vectors and tensors of
    other ranks (stacked expert weights, say) stay with AdamW."""
    return name.startswith(HIDDEN) and p.dim() == 2


class MuonAdamW(torch.optim.Optimizer):
    """An AdamW and a Muon over disjoint parameters, seen as one optimizer: its param_groups are
    AdamW's followed by Muon's (the same dicts), and both keep their state in its one `state`.

    So what walks param_groups sees every parameter (GradScaler.unscale_ and its inf check, the
    lr schedule, zero_grad); GradScaler.step calls step() only when no gradient overflowed, and
    then both parts step; state_dict() is an ordinary optimizer state dict over all the groups,
    which load_state_dict() restores into both parts exactly.
    """

    def __init__(self, adamw, muon):
        self.parts = (adamw, muon)
        super().__init__([*adamw.param_groups, *muon.param_groups], {})
        self._share()

    def _share(self):
        """Point the parts at this optimizer's groups and state (after construction and after
        load_state_dict, which replaces both)."""
        n = len(self.parts[0].param_groups)
        self.parts[0].param_groups, self.parts[1].param_groups = self.param_groups[:n], self.param_groups[n:]
        for part in self.parts:
            part.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "MuonAdamW takes no closure"
        for part in self.parts:
            part.step()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._share()


# Group entries that choose the kernel, not the maths: they belong to the device the run is on.
KERNEL_SETTINGS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer, saved):
    """Load a checkpoint's optimizer state. Each group keeps what this run configured for it: the
    peak_lr this config gave it (a checkpoint written before groups carried one has none), and
    its kernel settings, which come from the device the run resumes on, not the one that wrote
    the checkpoint: a CPU run's non-fused AdamW resumed on CUDA would be handed GradScaler's
    found_inf, which only the fused kernel takes, and a CUDA run's fused flag would follow it to
    the CPU. They are set before loading, so the state lands where they want it (fused AdamW
    keeps its step counts on the parameters' device, the others on the CPU)."""
    kept = [{k: group[k] for k in ("peak_lr", *KERNEL_SETTINGS) if k in group} for group in optimizer.param_groups]
    groups = [{**group, **mine} for group, mine in zip(saved["param_groups"], kept)]
    optimizer.load_state_dict({**saved, "param_groups": groups})
