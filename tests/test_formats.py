"""gpt_interventions/formats.py: GPT-2 weights in the Hugging Face format (local or from the hub) and export of ours."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import eval as eval_script
from gpt_interventions import formats
from gpt_interventions.errors import UsageError, run_main
from helpers import ROOT, VOCAB, make_shards, tiny_hf, tiny_run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"), train=(4_000,))


def ours(model, x):
    logits, _ = model(x)
    return logits


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.numerics
def test_hf_gpt2_loads_with_equal_logits(tmp_path, tie):
    hf = tiny_hf(tmp_path / "hf", tie=tie)
    model, info = formats.load_model(str(tmp_path / "hf"))
    assert info["source"] == "huggingface" and info["config"]["model"]["tie_weights"] is tie
    assert model.config.qkv_bias and not model.training
    tied = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert tied is tie
    x = torch.randint(0, VOCAB, (3, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(model, x), hf(x).logits, rtol=0, atol=1e-5)


def test_original_openai_file_layout_loads(tmp_path):
    # the hub's gpt2 model.safetensors has no "transformer." prefix and carries mask buffers
    hf = tiny_hf(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(tensors, path, metadata={"format": "pt"})
    model, _ = formats.load_model(str(tmp_path / "hf"))
    x = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(model, x), hf(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_in_transformers_with_equal_logits(data_dir, tmp_path, qkv_bias, tie):
    from transformers import GPT2LMHeadModel
    ckpt = tiny_run(data_dir, tmp_path / "run", qkv_bias=qkv_bias, tie_weights=tie)
    out = tmp_path / "export"
    run_main(eval_script.main, [ckpt, f"--export_hf={out}"])
    # vocab 256 is not GPT-2's: no tokenizer files (tests/test_hf_export.py has the rest)
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    assert hf.config.tie_word_embeddings is tie
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not tie  # untied head saved
    if not qkv_bias:
        assert all(not b.attn.c_attn.bias.any() for b in hf.transformer.h)
    else:
        assert hf.transformer.h[0].attn.c_attn.bias.abs().sum() > 0  # trained biases, not zeros
    model, _ = formats.load_model(ckpt)
    x = torch.randint(0, VOCAB, (3, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(model, x), rtol=0, atol=1e-5)
        back, _ = formats.load_model(str(out))  # and our loader reads our export
        torch.testing.assert_close(ours(back, x), ours(model, x), rtol=0, atol=1e-5)


def test_export_refuses_a_non_empty_directory(data_dir, tmp_path, capsys):
    ckpt = tiny_run(data_dir, tmp_path / "run")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("mine")
    with pytest.raises(SystemExit) as e:
        run_main(eval_script.main, [ckpt, f"--export_hf={tmp_path / 'taken'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "is not an empty directory" in err
    assert os.listdir(tmp_path / "taken") == ["config.json"]
    assert (tmp_path / "taken" / "config.json").read_text() == "mine"


def test_hub_id_goes_through_hf_hub_download(tmp_path, monkeypatch):
    import huggingface_hub
    hf = tiny_hf(tmp_path / "served")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(tmp_path / "served" / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model, info = formats.load_model("someone/tiny-gpt2")
    assert calls == [("someone/tiny-gpt2", "config.json"), ("someone/tiny-gpt2", "model.safetensors")]
    assert info["hub_id"] == "someone/tiny-gpt2" and info["model"] == "someone/tiny-gpt2"
    x = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(model, x), hf(x).logits, rtol=0, atol=1e-5)


def test_unreachable_hub_is_one_line_naming_a_local_directory(monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    def no_network(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("connection failed\nsecond line")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UsageError) as e:
        formats.load_model("gpt2-medium")
    assert "\n" not in str(e.value)
    assert "(no network)" in str(e.value) and "hf download gpt2-medium" in str(e.value)


def test_offline_hub_id_exits_2_with_one_line(data_dir, tmp_path):
    # the real hf_hub_download, offline and with an empty cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run([sys.executable, "eval.py", "gpt2", f"--data_dir={data_dir}", "--dataset=syn",
                           f"--ledger={tmp_path / 'results.jsonl'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stderr and "--local-dir DIR" in proc.stderr
    assert not (tmp_path / "results.jsonl").exists()


def test_local_path_typo_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("hub asked"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for spec in ("out/typo", "missing.pt", "./gpt2"):
        with pytest.raises(UsageError, match="not found"):
            formats.load_model(spec)
    (tmp_path / "out" / "started").mkdir()
    for name in ("config.json", "metrics.jsonl"):  # a run stopped before its first checkpoint
        (tmp_path / "out" / "started" / name).write_text("{}")
    with pytest.raises(UsageError, match="run directory out/started has no ckpt.pt yet"):
        formats.load_model("out/started")


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "is a 'llama' model; only GPT-2"),
    ({"activation_function": "relu"}, "does not implement this GPT-2 variant (activation_function)"),
    ({"scale_attn_by_inverse_layer_idx": True}, "variant (scale_attn_by_inverse_layer_idx)"),
])
def test_other_architectures_are_refused(tmp_path, change, message):
    tiny_hf(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(UsageError) as e:
        formats.load_model(str(tmp_path / "hf"))
    assert message in str(e.value)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    tiny_hf(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "n_layer": 3}))
    with pytest.raises(UsageError, match="weights do not fit the model config"):
        formats.load_model(str(tmp_path / "hf"))
