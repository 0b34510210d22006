import json

import pytest
import torch

from moe_core.model_io import (
    ModelLoadError,
    UnsupportedArchitecture,
    adapter_for_config,
    load_config,
    load_model,
    tiny_model,
)


def test_tiny_model_summary(tiny):
    s = tiny.summary()
    assert s.n_layers == 2 and s.hidden_size == 64 and s.intermediate_size == 192
    assert 0.3 < s.ffn_share < 0.8
    assert s.ffn_params == 2 * 3 * 64 * 192
    assert s.dtype == "float32" and s.device == "cpu"


def test_adapter_weights_reproduce_mlp(tiny):
    """gate/up/down from the adapter rebuild the family's own MLP output (Phi-3's fused gate_up too)."""
    mlp = tiny.mlp(0)
    w_gate, w_up, w_down = tiny.adapter.weights(mlp)
    x = torch.randn(5, 64)
    act = tiny.adapter.act_fn(mlp)
    manual = (act(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
    torch.testing.assert_close(manual, mlp(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "mixtral", "bert", "mamba"])
def test_unsupported_architectures_are_refused_from_config(model_type):
    config = type("Cfg", (), {"model_type": model_type})()
    with pytest.raises(UnsupportedArchitecture, match=model_type):
        adapter_for_config(config)


def test_gpt2_folder_refused_before_weights_load(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)  # config only: no weights at all
    with pytest.raises(UnsupportedArchitecture, match="no gate"):
        load_model(str(tmp_path))


def test_missing_path_and_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_config(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nothing.gguf"))


def test_local_folder_roundtrip(tmp_path):
    dense = tiny_model("qwen2")
    dense.model.save_pretrained(tmp_path)
    dense.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    ids = torch.randint(0, 200, (1, 12))
    torch.testing.assert_close(again.model(ids).logits, dense.model(ids).logits)
    assert again.adapter.family == "Qwen2"


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(str(bad))


def test_unknown_tiny_family():
    with pytest.raises(ModelLoadError, match="Families"):
        tiny_model("gpt2")


@pytest.mark.slow
def test_default_model_loads_and_is_cached(smollm2, tmp_path):
    s = smollm2.summary()
    assert (s.family, s.n_layers, s.hidden_size, s.intermediate_size) == ("Llama", 30, 576, 1536)
    assert 130e6 < s.n_params < 140e6 and s.dtype == "float32"
    from moe_core.model_io import cache_dir

    folder = cache_dir() / "smollm2-135m-instruct"
    assert (folder / "config.json").exists()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = smollm2.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0, ids.shape[1] :])
