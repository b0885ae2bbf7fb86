"""The optimizer: AdamW over parameter groups that hold every parameter exactly once."""

import torch


def configure_optimizer(model, tc, device_type):
    """AdamW with a decay and a no-decay group; every parameter in exactly one group."""
    params = dict(model.named_parameters())  # a tied weight appears once
    if tc.decay_params == "all":
        decay, no_decay = list(params.values()), []
    else:  # matrices (Linear weights, embeddings) decay; biases and LayerNorm gains do not
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
    ids = [id(p) for p in decay + no_decay]
    assert len(ids) == len(set(ids)) == len(params), "each parameter must be optimised exactly once"
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                             fused=device_type == "cuda")
