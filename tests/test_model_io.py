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
    with pytest.raises(ModelLoadError, match="No tiny model for 'nope'.*Families: llama"):
        tiny_model("nope")
    with pytest.raises(UnsupportedArchitecture, match="GPT-2 uses a plain two-layer MLP"):
        tiny_model("gpt2")


@pytest.mark.parametrize(
    ("family", "names"),
    [
        ("lfm2", ("feed_forward", "w1", "w3", "w2", None, "silu")),  # w1/w3/w2, F.silu in its forward
        ("modernbert-decoder", ("mlp", "Wi", None, "Wo", "act", "gelu")),  # fused Wi: act on its first half
        ("moshi", ("mlp", "fc1", None, "fc2", "activation_fn", "silu")),  # fused fc1, gate half first
        ("gemma3", ("mlp", "gate_proj", "up_proj", "down_proj", "act_fn", "gelu_pytorch_tanh")),
    ],
)
def test_adapter_finds_the_mlp_from_the_module_structure(family, names):
    """Names the model's own modules; gate/up/down from it rebuild the MLP output on every layer."""
    dense = tiny_model(family, intermediate_size=128)
    a = dense.adapter
    assert (a.mlp_name, a.gate_name, a.up_name, a.down_name, a.act_attr, a.act_key) == names
    for i in range(dense.n_layers):
        mlp = dense.mlp(i)
        w_gate, w_up, w_down = a.weights(mlp)
        x = torch.randn(1, 5, 64)
        manual = (a.act_fn(mlp)(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
        torch.testing.assert_close(manual, mlp(x), rtol=1e-5, atol=1e-6)


def test_an_mlp_that_computes_more_than_the_gated_formula_is_refused_after_loading_too():
    """The structure looks right, the forward is not: check() (run by every loader) names the layer."""
    dense = tiny_model("llama")
    mlp = dense.mlp(1)
    plain = mlp.forward
    mlp.forward = lambda x: 2 * plain(x)  # a multiplier the module tree does not show
    with pytest.raises(UnsupportedArchitecture, match="layer 1's MLP .* computes something other"):
        dense.adapter.check(dense.model)


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_device_that_cannot_run_is_refused_with_what_to_use(capsys):
    from moe_core.cli import main
    from moe_core.model_io import ModelLoadError

    with pytest.raises(ModelLoadError, match="Use --device cpu"):
        load_model("builtin:tiny-llama", device="cuda")
    with pytest.raises(ModelLoadError, match="Unknown device"):
        load_model("builtin:tiny-llama", device="gpu0")
    assert main(["eval", "--model", "builtin:tiny-llama", "--device", "cuda"]) != 0
    err = capsys.readouterr().err
    assert "Use --device cpu" in err and "internal error" not in err
