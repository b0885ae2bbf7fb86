"""Load any model we score, the one way eval.py and sample.py share; export ours to Hugging Face.

A MODEL argument is one of
  - a checkpoint file written by train.py (out/RUN/ckpt.pt, or a ckpt_STEP.pt snapshot),
  - a run directory (its ckpt.pt, the latest checkpoint),
  - a directory in the Hugging Face GPT-2 format (config.json and model.safetensors),
  - a Hugging Face hub id of a GPT-2 model (gpt2, openai-community/gpt2, gpt2-medium, ...).
GPT-2 maps onto our GPT with qkv_bias=True and tie_weights=True, by parameter name; Hugging Face
stores the four projections as Conv1D, whose weights are (in, out), transposed from nn.Linear.
"""

import dataclasses
import json
import logging
import os
import re
from contextlib import contextmanager

import torch

from gpt_interventions.atomic import atomic_write, write_json
from gpt_interventions.checkpoint import load_checkpoint
from gpt_interventions.errors import UsageError
from gpt_interventions.tokenizer import EOT
from model import GPT, GPTConfig

HF_FILES = ("config.json", "model.safetensors")
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# causal-mask buffers that older GPT-2 files (the original OpenAI upload) carry; not weights
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_model(spec, device="cpu"):
    """(model in eval mode on `device`, info) for a MODEL argument; UsageError for bad input.

    info is plain data for results: model (what to call it), source, checkpoint or hub_id, and
    the config (ours: model and train config of the run; GPT-2: the model config).
    """
    if os.path.isfile(spec):
        if os.path.basename(spec) in HF_FILES:
            raise UsageError(f"{spec} is one file of a Hugging Face model; pass its directory")
        model, info = _from_checkpoint(spec)
    elif os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "ckpt.pt")):
            model, info = _from_checkpoint(os.path.join(spec, "ckpt.pt"))
        elif os.path.isfile(os.path.join(spec, "metrics.jsonl")):  # train.py writes it first
            raise UsageError(f"run directory {spec} has no ckpt.pt yet")
        elif os.path.isfile(os.path.join(spec, "config.json")):
            model, info = _from_hf(*(os.path.join(spec, name) for name in HF_FILES), label=spec)
        else:
            raise UsageError(f"{spec} holds neither ckpt.pt (a run) nor config.json (a Hugging Face model)")
    elif _looks_like_hub_id(spec):
        model, info = _from_hf(*_download(spec), label=spec)
        info["hub_id"] = spec
    else:
        raise UsageError(f"{spec} not found")
    return model.to(device).eval(), info


def _looks_like_hub_id(spec):
    """owner/name or name, and not a path into a local directory that exists (out/typo)."""
    head = spec.split("/")[0]
    return bool(HUB_ID.match(spec)) and not spec.endswith(".pt") and not ("/" in spec and os.path.isdir(head))


def _build(config, state_dict, where):
    """GPT from a complete state dict, without spending time on a random init (meta device)."""
    with torch.device("meta"):
        model = GPT(config)
    try:
        model.load_state_dict(state_dict, assign=True)
    except RuntimeError as e:  # missing, unexpected or misshapen weights
        raise UsageError(f"{where}: weights do not fit the model config "
                         f"({' '.join(str(e).split())[:200]})") from None
    if config.tie_weights:  # assign=True gave the two names two tensors: share one again
        model.lm_head.weight = model.transformer.wte.weight
    return model


def _from_checkpoint(path):
    ckpt = load_checkpoint(path)
    try:
        config = GPTConfig(**ckpt["model_config"])
    except (KeyError, TypeError) as e:
        raise UsageError(f"{path} has no usable model_config ({e})") from None
    model = _build(config, {k: v.float() for k, v in ckpt["model"].items()}, path)
    info = {"model": path, "source": "checkpoint", "checkpoint": path, "step": ckpt.get("step"),
            "config": {"model": ckpt["model_config"], "train": ckpt.get("train_config")}}
    return model, info


# ----------------------------------------------------------------------------------------------
# Hugging Face GPT-2 format


def _download(repo_id):
    """Paths of the hub model's config.json and model.safetensors (the hub's cache is reused)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    hint = (f"on a machine with network run `hf download {repo_id} {' '.join(HF_FILES)} --local-dir DIR` "
            "and pass DIR as MODEL")
    try:
        with _quiet("huggingface_hub"):  # its retry warnings would bury the one-line error
            return [hf_hub_download(repo_id, name) for name in HF_FILES]
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else "no network"
        raise UsageError(f"cannot fetch {repo_id} from the Hugging Face hub ({why}) and it is not "
                         f"in the local cache; {hint}") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{repo_id} is neither a local path nor a model on the Hugging Face hub") from None
    except EntryNotFoundError:
        raise UsageError(f"{repo_id} on the Hugging Face hub lacks {' or '.join(HF_FILES)}; "
                         "only GPT-2 models in safetensors format load") from None
    except HFValidationError:
        raise UsageError(f"{repo_id} not found") from None
    except (HfHubHTTPError, OSError) as e:
        raise UsageError(f"cannot fetch {repo_id} from the Hugging Face hub "
                         f"({str(e).strip().splitlines()[0][:120]}); {hint}") from None


@contextmanager
def _quiet(logger_name):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def config_from_hf(cfg, where):
    """Our GPTConfig for a Hugging Face GPT-2 config.json; UsageError if it is another model."""
    if cfg.get("model_type") != "gpt2":
        raise UsageError(f"{where} is a {cfg.get('model_type')!r} model; only GPT-2 maps onto ours")
    try:
        n_embd = cfg["n_embd"]
        config = GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=n_embd,
                           block_size=cfg["n_positions"], vocab_size=cfg["vocab_size"], dropout=0.0,
                           qkv_bias=True, tie_weights=cfg.get("tie_word_embeddings", True))
    except KeyError as e:
        raise UsageError(f"{where} lacks {e.args[0]}") from None
    # variants our GPT does not compute: refuse them rather than score a different function
    differs = {"activation_function": cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"),
               "layer_norm_epsilon": cfg.get("layer_norm_epsilon", 1e-5) != 1e-5,
               "n_inner": cfg.get("n_inner") not in (None, 4 * n_embd),
               "scale_attn_weights": not cfg.get("scale_attn_weights", True),
               "scale_attn_by_inverse_layer_idx": cfg.get("scale_attn_by_inverse_layer_idx", False)}
    if any(differs.values()):
        raise UsageError(f"{where}: our GPT does not implement this GPT-2 variant "
                         f"({', '.join(k for k, v in differs.items() if v)})")
    return config


def _from_hf(config_path, weights_path, label):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise UsageError(f"{path} not found; a Hugging Face GPT-2 directory holds {' and '.join(HF_FILES)}")
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except (ValueError, OSError) as e:
        raise UsageError(f"{config_path} is not readable JSON ({str(e)[:120]})") from None
    config = config_from_hf(cfg, config_path)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{weights_path} is not a readable safetensors file ({str(e)[:120]})") from None
    state = {}
    for name, tensor in tensors.items():
        name = name.removeprefix("transformer.")  # save_pretrained writes it; the OpenAI upload does not
        if name.endswith(HF_BUFFERS):
            continue
        if name != "lm_head.weight":
            name = "transformer." + name
        state[name] = (tensor.t() if name.endswith(CONV1D) else tensor).float().contiguous()
    if config.tie_weights and "transformer.wte.weight" in state:  # a tied file stores the head once, as wte
        state["lm_head.weight"] = state["transformer.wte.weight"]
    model = _build(config, state, weights_path)
    return model, {"model": label, "source": "huggingface", "config": {"model": dataclasses.asdict(config)}}


def export_hf(model, out_dir):
    """Write `model` as a Hugging Face GPT-2 directory that GPT2LMHeadModel.from_pretrained loads.

    GPT-2 always has a QKV bias: without one, ours is written as zeros, which computes the same.
    """
    from safetensors.torch import save
    check_new_dir(out_dir)
    c = model.config
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_weights:
            continue  # stored once, as wte; tie_word_embeddings says to share it
        tensor = tensor.t() if name.endswith(CONV1D) else tensor
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: c.vocab_size]  # pad_vocab's unused rows are not part of the model
        state[name] = tensor.detach().float().cpu().contiguous()
    if not c.qkv_bias:
        for i in range(c.n_layer):
            state[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * c.n_embd)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
              "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
              "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_weights,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "n_inner": None,
              "attn_pdrop": c.dropout, "embd_pdrop": c.dropout, "resid_pdrop": c.dropout,
              "torch_dtype": "float32"}
    if c.vocab_size > EOT:  # GPT-2 BPE: <|endoftext|> begins and ends documents
        config.update(bos_token_id=EOT, eos_token_id=EOT)
    os.makedirs(out_dir, exist_ok=True)
    data = save(state, metadata={"format": "pt"})
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda f: f.write(data))
    write_json(os.path.join(out_dir, "config.json"), config)


def check_new_dir(path):
    """Exports never overwrite: the directory must not exist yet or be empty."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"{path} exists and is not an empty directory; choose another")
