"""The model card (README.md) of a Hugging Face export: what the model is, how it was trained and
scored, and how to load it. For one of our checkpoints the facts come from the checkpoint (configs,
step, tokens) and from the run's eval.json (eval.py's results of that very checkpoint); for a model
we only converted (GPT-2 weights, the book's format) the card says so and no more.
"""

import dataclasses
import json
import os

from gpt_interventions import eval_results
from gpt_interventions.errors import UsageError
from gpt_interventions.tables import fmt, table
from gpt_interventions.training import TrainConfig
from model import GPTConfig

# flags that name places on the machine that trained the model or how a call was made: not the model
LOCAL = ("out_dir", "data_dir", "resume", "dry_run")
SOURCES = {"huggingface": "a GPT-2 model in the Hugging Face format",
           "story-huggingface": "one of the story's Hugging Face uploads (the book's GPTModel)",
           "book": "a model in the book's format (Raschka's GPTModel: model.json and model.safetensors)"}


def model_card(info, config, tokenizer, where):
    """README.md's text for the export of the model load_model described by `info` (GPTConfig
    `config`); `tokenizer`: whether the export carries the GPT-2 tokenizer; `where`: the directory
    or hub id that users load it from."""
    ours = info["source"] == "checkpoint"
    train = (info["config"].get("train") or {}) if ours else {}
    name = train.get("run_name") or (os.path.basename(os.path.dirname(os.path.abspath(info["checkpoint"])))
                                     if ours else os.path.basename(os.path.normpath(info["model"])))
    size = (f"{config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, "
            f"context {config.block_size} tokens, vocabulary {config.vocab_size}")
    parts = [_front_matter(tokenizer), f"# {name}\n"]
    if ours:
        parts += [f"A GPT-2-architecture language model ({size}) trained with gpt-interventions' train.py "
                  f"and exported by `eval.py --export_hf` from its checkpoint `{os.path.basename(info['checkpoint'])}` "
                  f"at step {info.get('step')}.\n",
                  _results(info), _training(info, train)]
    else:
        origin = f"`{info['hub_id']}` on the Hugging Face hub" if info.get("hub_id") else f"`{name}`"
        parts += [f"{origin}, {SOURCES.get(info['source'], info['source'])}, converted to the Hugging Face "
                  f"GPT-2 format by gpt-interventions' `eval.py --export_hf` ({size}). The weights are the "
                  "original's, unchanged (the same logits); this project did not train it, so see the "
                  "original for how it was trained, its evaluations and its license.\n"]
    parts += [_config_block(info, config, train), _usage(config, tokenizer, where)]
    return "\n".join(parts)


def _front_matter(tokenizer):
    tags = ["gpt2", "gpt-interventions"]
    return ("---\nlibrary_name: transformers\n" + ("pipeline_tag: text-generation\n" if tokenizer else "") +
            "tags:\n" + "".join(f"- {t}\n" for t in tags) + "---\n")


def _results(info):
    """eval.py's results for this very checkpoint (same file name and step); older ones are left out."""
    try:
        rows = eval_results.read(os.path.dirname(info["checkpoint"]))
    except UsageError:  # unreadable: the card then says there is none
        rows = []
    mine = sorted(eval_results.of_checkpoint(rows, (os.path.basename(info["checkpoint"]),), info.get("step")),
                  key=eval_results.key)
    mine = [(eval_results.scored(r), r) for r in mine]
    losses = [(key, r) for key, r in mine if {"loss", "ppl", "tokens", "dtype"} <= r.keys()]
    tasks = [(key, r) for key, r in mine if {"acc_norm", "acc", "examples"} <= r.keys()]  # --task=hellaswag
    if not losses and not tasks:
        return ("## Evaluation\n\nNo held-out result for this checkpoint in the run's eval.json "
                "(`python eval.py RUN` writes one).\n")
    text = "## Evaluation\n\n"
    if losses:
        body = table(["dataset/split", "loss", "perplexity", "tokens scored", "dtype"],
                     [[key, f"{r['loss']:.6f}", f"{r['ppl']:.2f}", f"{r['tokens']:,}", r["dtype"]]
                      for key, r in losses], markdown=True)
        text += ("Held-out loss (cross-entropy in nats per token, the token-weighted mean over "
                 "non-overlapping context-length windows read in order from the split, by gpt-interventions' "
                 "eval.py; `tokens scored` below the split's size means a token budget):\n\n" + body + "\n")
    if tasks:
        body = table(["task/split", "acc_norm", "acc", "examples"],
                     [[key, f"{r['acc_norm']:.4f}", f"{r['acc']:.4f}", f"{r['examples']:,}"] for key, r in tasks],
                     markdown=True)
        text += ("\n" if losses else "") + ("HellaSwag, completion style (`eval.py --task=hellaswag`: acc_norm "
                                            "picks the ending with the lowest mean loss per token, acc the lowest "
                                            "summed loss):\n\n" + body + "\n")
    return text


def _training(info, train):
    tokens, steps = info.get("train_tokens"), info.get("step")
    trained = (f"{tokens:,} tokens in {steps:,} optimizer steps" if tokens is not None and steps is not None
               else f"{steps} optimizer steps")
    defaults = {**dataclasses.asdict(GPTConfig()), **dataclasses.asdict(TrainConfig())}
    values = {**info["config"]["model"], **train}
    flags = [f"--{k}={fmt(v)}" for k, v in values.items() if k not in LOCAL and k in defaults and v != defaults[k]]
    return (f"## Training\n\n{trained} of the `{train.get('dataset')}` dataset (`prepare_data.py "
            f"--dataset={train.get('dataset')}`). Flags that differ from train.py's defaults (the story's "
            f"baseline run):\n\n"
            f"```\npython train.py {' '.join(flags)}\n```\n")


def _config_block(info, config, train):
    configs = {"model": dataclasses.asdict(config)}
    if train:
        configs["train"] = {k: v for k, v in train.items() if k not in LOCAL}
    return ("<details><summary>Full configuration</summary>\n\n```json\n" + json.dumps(configs, indent=2) +
            "\n```\n</details>\n")


def _usage(config, tokenizer, where):
    if not tokenizer:
        return (f"## Use\n\nNo tokenizer is included: this model's vocabulary ({config.vocab_size} ids) is not "
                f"the GPT-2 BPE's, so its ids mean whatever the data it was trained on meant. Feed it token ids:\n\n"
                f"```python\nimport torch\nfrom transformers import AutoModelForCausalLM\n"
                f"model = AutoModelForCausalLM.from_pretrained({where!r})\n"
                f"logits = model(torch.tensor([[1, 2, 3]])).logits\n```\n")
    return (f"## Use\n\nThe GPT-2 tokenizer (BPE, `<|endoftext|>` = 50256) is included; generation stops at "
            f"`<|endoftext|>` and at the context length ({config.block_size} tokens, prompt included).\n\n"
            f"```python\nfrom transformers import pipeline\n"
            f"generate = pipeline(\"text-generation\", model={where!r})\n"
            f"print(generate(\"Every effort moves you\", max_new_tokens=20, do_sample=False)[0][\"generated_text\"])\n"
            f"```\n\nlm-evaluation-harness scores it as any Hugging Face model: "
            f"`lm_eval --model hf --model_args pretrained={where} --tasks hellaswag`.\n")
