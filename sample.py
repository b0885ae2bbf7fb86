"""Smoke test of a model: a few seeded continuations of a prompt.

    python sample.py MODEL [--prompt="Every effort moves you"] [--num_samples=3] [--seed=42] ...

MODEL is anything eval.py takes (gpt_interventions/formats.py). The same seed gives the same text on the CPU.
"""

import math
from dataclasses import dataclass

import torch

from gpt_interventions.cli import field, parse_config
from gpt_interventions.device import PTDTYPE, autocast, setup_dist
from gpt_interventions.errors import UsageError, run_main
from gpt_interventions.formats import load_model
from gpt_interventions.tokenizer import EOT, get_tokenizer

USAGE = "MODEL [--key=value ...]   (MODEL: ckpt.pt, run directory, Hugging Face directory or hub id)"


@dataclass
class SampleConfig:
    prompt: str = field("Every effort moves you", "text to continue; empty: start from <|endoftext|>")
    num_samples: int = field(3, "how many continuations")
    max_new_tokens: int = field(50, "tokens generated per continuation")
    temperature: float = field(1.0, "softmax temperature; 0: greedy")
    top_k: int = field(25, "sample only from the k most likely tokens; 0: from all")
    seed: int = field(42, "seed of the sampler")
    dtype: str = field("float32", "autocast dtype", choices=tuple(PTDTYPE))
    device: str = field("auto", "auto, cpu, cuda or cuda:N")


def main(argv):
    (sc,), positionals, _ = parse_config(argv, [SampleConfig], "sample.py", USAGE, max_positionals=1)
    if not positionals:
        raise UsageError(f"which model? usage: sample.py {USAGE}")
    if sc.num_samples <= 0 or sc.max_new_tokens < 0 or not 0 <= sc.temperature < math.inf or sc.top_k < 0:
        raise UsageError("--num_samples must be positive; --max_new_tokens, --top_k >= 0; --temperature finite, >= 0")
    if not 0 <= sc.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {sc.seed}")
    d = setup_dist(sc.device)
    enc = get_tokenizer()
    ids = enc.encode(sc.prompt, allowed_special={"<|endoftext|>"}) or [EOT]
    model, _ = load_model(positionals[0], d.device)
    if max(ids) >= model.config.vocab_size:
        raise UsageError(f"the prompt's GPT-2 token {max(ids)} is outside the model's vocab_size "
                         f"{model.config.vocab_size}: this model was not trained on GPT-2 tokens")
    generator = torch.Generator(device=d.device).manual_seed(sc.seed)
    idx = torch.tensor([ids] * sc.num_samples, device=d.device)  # (num_samples, T)
    with autocast(d.device_type, sc.dtype):
        out = model.generate(idx, sc.max_new_tokens, sc.temperature, sc.top_k or None, generator)
    for row in out.tolist():
        # a vocab padded past GPT-2's (50304) may sample ids the tokenizer has no text for
        print(enc.decode([t for t in row if t < enc.n_vocab]))
        print("-" * 40)


if __name__ == "__main__":
    run_main(main)
