"""Every causal-LM family of the installed transformers, enumerated from its own auto mapping (not a list typed
here): a tiny random model of each is either converted (CMoE S1A3E4; with every expert on it equals the dense
model) and exported exact (reloaded in one clean process: identical logits), or refused from its meta-device
skeleton, before any weight exists, with a stated reason. Run one layer at a time from the captured per-layer
arguments, every converted family gives its own forward's logits. About a minute on two CPU cores."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import single_thread
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moe_core.config import CMoEConfig
from moe_core.export import ExportConfig, export_model, reload_logits
from moe_core.layerwise import capture_layer_inputs, head_logits, run_layer
from moe_core.methods import convert
from moe_core.model_io import (
    GATED_FAMILIES,
    DenseModel,
    UnsupportedArchitecture,
    adapter_for_config,
    adapter_for_model,
    byte_tokenizer,
    load_model,
    tiny_config,
    tiny_model,
)
from moe_core.moe import MoEMLP, RoutingPolicy

FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
WIDTH = 128  # the tiny models' intermediate size (hidden 64, 2 layers, 4 heads of 16, 2 KV heads)
IDS = torch.randint(4, 250, (1, 16), generator=torch.Generator().manual_seed(3))
DENSE_TOL, EXPORT_TOL = 1e-5, 1e-4

# Families that cannot be built tiny here, and why (found by trying each one).
SKIPPED = {
    "gemma3n": "its vision tower is a timm model, and timm is not installed",
    "dots3_note": "its default config sets per-layer options for layers 25-41, which a 2-layer model lacks",
    "zamba": "transformers 5.24 cannot tie Zamba's shared transformer block in a 2-layer model",
    "cohere_compass_text": "transformers 5.24 cannot build it from its own config (KeyError: 'full_attention')",
    "gemma4_assistant": "a draft model for speculative decoding: it runs on the main model's KV cache",
    "gemma4_unified_assistant": "a draft model for speculative decoding: it runs on the main model's KV cache",
}
# The reasons a family may be refused for; every refusal must state one of them.
REASONS = {
    "plain MLP": r"uses a plain two-layer MLP \(.+\) with no gate",
    "already MoE": r"is already a Mixture-of-Experts model \(layer \d+ holds",
    "encoder-decoder": r"is an encoder-decoder model",
    "encoder": r"is an encoder \(its layers are .*encoder",
    "no MLP": r"has no gated MLP \(its modules:",
    "several stacks": r"stacks of layers \(.+\), not one decoder stack",
    "beyond the gated MLP": r"also applies .+, beyond|computes something other than|carry biases",
}
SPOT_CHECKS = {  # well-known refusals, each with the reason it must give
    "gpt2": "plain MLP",
    "opt": "plain MLP",
    "mixtral": "already MoE",
    "qwen2_moe": "already MoE",
    "deepseek_v3": "already MoE",
    "bert": "encoder",
    "bart": "encoder-decoder",
    "mamba": "no MLP",
    "bitnet": "beyond the gated MLP",  # a norm between the gated product and down_proj
    "gemma3n_text": "beyond the gated MLP",  # activation sparsity in its first layers, seen only by running it
    "recurrent_gemma": "beyond the gated MLP",  # biases on the projections
}


def _params():
    for family in FAMILIES:
        if family in SKIPPED:
            yield pytest.param(family, marks=pytest.mark.skip(reason=SKIPPED[family]))
        else:
            yield family


def _classify(family: str):
    """The adapter of a family's tiny config, or the refusal (from the meta-device skeleton only)."""
    try:
        return adapter_for_config(tiny_config(family, intermediate_size=WIDTH))
    except UnsupportedArchitecture as exc:
        return exc


@torch.no_grad()
def _convert_and_export(family: str, folder):
    """Convert, check every-expert-on == dense, then route top-1 (so the MoE differs from the dense model and
    a reload without the MoE blocks would show) and export exact; the record to check."""
    torch.manual_seed(0)
    dense = tiny_model(family, intermediate_size=WIDTH)
    dense_logits = dense.model(IDS).logits
    layerwise = torch.cat(_layer_by_layer(dense, IDS, batch_size=1))
    moe = convert(dense, IDS, CMoEConfig(experts="S1A3E4"))
    blocks = [moe.mlp(i) for i in range(moe.n_layers) if isinstance(moe.mlp(i), MoEMLP)]
    for block in blocks:
        block.set_policy(RoutingPolicy("topk", k=block.n_experts))
    all_on = moe.model(IDS).logits
    for block in blocks:
        block.set_policy(RoutingPolicy("topk", k=1))
    routed = moe.model(IDS).logits
    export_model(moe, folder, ExportConfig(format="exact", verify=False))
    return {
        "n_layers": moe.n_layers,
        "model_type": moe.model.config.model_type,  # emu3's causal LM is built on its emu3_text_model config
        "blocks": len(blocks),
        "layerwise_vs_dense": float((layerwise - dense_logits).abs().max()),
        "all_on_vs_dense": float((all_on - dense_logits).abs().max()),
        "routed_vs_dense": float((routed - dense_logits).abs().max()),
        "scale": float(dense_logits.abs().max()),  # Cohere's logit_scale makes tiny logits: compare relative
        "routed": routed,
        "folder": folder,
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{family: adapter | refusal | record | exception}; every export reloaded in ONE clean process.

    One thread, here and in the reloading process: on tiny tensors thread hand-offs cost more than the maths
    (100x on a busy 2-core machine)."""
    with single_thread(), pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        yield _convert_and_reload_all(tmp_path_factory.mktemp("families"))


def _convert_and_reload_all(root) -> dict:
    out = {}
    for family in FAMILIES:
        if family in SKIPPED:
            continue
        found = _classify(family)
        if isinstance(found, UnsupportedArchitecture):
            out[family] = found
            continue
        try:
            out[family] = _convert_and_export(family, root / family)
        except Exception as exc:  # reported by that family's test, not by all of them
            out[family] = exc
    records = {f: r for f, r in out.items() if isinstance(r, dict)}
    loaded = reload_logits([(r["folder"], True) for r in records.values()], IDS, IDS[:, :4], 2)
    for record, reloaded in zip(records.values(), loaded, strict=True):
        record["reloaded"] = reloaded
    return out


@pytest.mark.parametrize("family", list(_params()))
def test_every_family_converts_and_exports_exactly_or_is_refused_with_a_reason(results, family):
    result = results[family]
    if isinstance(result, UnsupportedArchitecture):
        message = str(result)
        stated = [name for name, pattern in REASONS.items() if re.search(pattern, message)]
        assert stated, f"{family} refused without a stated reason: {message}"
        assert re.match(r"Architecture '[\w-]+' is not supported: ", message)  # gpt-sw3 is a gpt2 config
        assert SPOT_CHECKS.get(family, stated[0]) in stated
        return
    if isinstance(result, Exception):
        raise result
    assert family not in SPOT_CHECKS, f"{family} should have been refused ({SPOT_CHECKS.get(family)})"
    assert result["blocks"] == result["n_layers"] == 2
    scale = result["scale"]
    assert result["layerwise_vs_dense"] <= DENSE_TOL  # the captured per-layer arguments are the model's own
    assert result["all_on_vs_dense"] <= min(DENSE_TOL, 1e-4 * scale)  # every expert on, unit gates: dense
    assert result["routed_vs_dense"] > 5e-4 * scale  # top-1 drops neurons: 5x the export tolerance below
    reloaded = result["reloaded"]
    assert reloaded["class"] == "MoEStudioForCausalLM" and not reloaded["moe_core_imported"]
    assert float((reloaded["logits"] - result["routed"]).abs().max()) <= min(EXPORT_TOL, 1e-4 * scale)
    config = json.loads((result["folder"] / "config.json").read_text())
    assert (
        sorted(config["moe_layers"]) == ["0", "1"]
        and config["moe_studio_base"]["model_type"] == result["model_type"]
    )


def test_the_displayed_family_list_is_what_the_structure_check_accepts(results):
    accepted = {f for f, r in results.items() if not isinstance(r, UnsupportedArchitecture)}
    assert set(GATED_FAMILIES) == accepted
    assert {"llama", "granite", "cohere", "stablelm", "gemma3", "gemma3_text", "smollm3", "glm"} <= accepted


def test_refusal_comes_before_any_weight_is_read(tmp_path):
    """Config-only folders: a MoE model and a gated family whose MLP does more than the formula."""
    for family, reason in [("mixtral", "already a Mixture-of-Experts"), ("gemma3n_text", "something other")]:
        tiny_config(family, intermediate_size=WIDTH).save_pretrained(tmp_path / family)  # no weights at all
        with pytest.raises(UnsupportedArchitecture, match=reason):
            load_model(str(tmp_path / family))


def test_a_composite_folder_loads_and_its_adapter_finds_the_text_decoder(tmp_path):
    """Gemma-3 (vision tower + text_config) saved and loaded from a folder, like a hub checkpoint."""
    dense = tiny_model("gemma3", intermediate_size=WIDTH)
    dense.model.save_pretrained(tmp_path)
    dense.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert again.adapter.layers_path == "model.language_model.layers" and again.adapter.family == "Gemma3"
    with torch.no_grad():
        torch.testing.assert_close(again.model(IDS).logits, dense.model(IDS).logits)
    summary = again.summary()
    assert (summary.hidden_size, summary.intermediate_size, summary.n_layers) == (64, WIDTH, 2)


def test_builtin_tiny_models_of_new_families_load_by_name():
    dense = load_model("builtin:tiny-granite")
    assert dense.adapter.family == "Granite" and dense.summary().intermediate_size == 192
    with pytest.raises(UnsupportedArchitecture, match="GPT-2 uses a plain two-layer MLP"):
        load_model("builtin:tiny-gpt2")


@pytest.mark.parametrize("family", ["gemma3", "granite"])
def test_converted_checkpoints_of_new_families_reload_identically(family, tmp_path, one_thread):
    """save_converted / load_converted on a composite family (layers under model.language_model) and Granite."""
    from moe_core.checkpoint import load_converted, save_converted

    dense = tiny_model(family, intermediate_size=WIDTH)
    moe = convert(dense, IDS, CMoEConfig(experts="S1A3E4"))
    save_converted(moe, tmp_path / "ckpt", {"model": {"spec": f"builtin:tiny-{family}"}})
    again = load_converted(tmp_path / "ckpt")
    assert all(isinstance(again.mlp(i), MoEMLP) for i in range(again.n_layers))
    with torch.no_grad():
        torch.testing.assert_close(again.model(IDS).logits, moe.model(IDS).logits, rtol=0, atol=1e-6)


def _layer_by_layer(dense, ids, batch_size: int, inputs=None) -> list[torch.Tensor]:
    """Logits per micro-batch from the layer-by-layer path: captured inputs, each layer in turn, the model's head."""
    inputs = inputs or capture_layer_inputs(dense, ids, batch_size)
    for layer in dense.adapter.layers(dense.model):
        inputs = run_layer(layer, inputs)
    return head_logits(dense.model, dense.adapter, inputs)


# Families whose layers are called differently, with text-config changes so that the arguments matter: sliding
# windows of 8 on 32 tokens, a convolution layer before an attention layer. per_layer: layer 0's arguments are
# not layer 1's (mask, rotary tables, Gemma-4's per-layer input), so reusing them must change the logits or fail.
LAYER_CALLS = {
    "llama": ({}, False),
    "phi3": ({}, False),
    "mistral": ({"sliding_window": 8}, False),
    "gemma3": ({"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}, True),
    "gemma4_text": ({"sliding_window": 8}, True),  # sliding then full, and a per-layer input (E2B / E4B)
    "lfm2": ({"layer_types": ["conv", "full_attention"]}, False),
    "lfm3": ({}, True),  # conv then attention: layer 0 gets no rotary tables, layer 1 needs them
    "falcon_h1": ({}, False),  # each layer returns a tuple
    "xlstm": ({}, False),  # each block returns (hidden, state); the backbone is model.backbone
}
LONG_IDS = torch.randint(4, 250, (3, 32), generator=torch.Generator().manual_seed(5))


def _tiny_with(family: str, changes: dict) -> DenseModel:
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, intermediate_size=WIDTH)
    text = config.get_text_config(decoder=True)
    for key, value in changes.items():
        assert hasattr(text, key), f"{family}'s config has no {key}"
        setattr(text, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return DenseModel(model, byte_tokenizer(), adapter_for_model(model), f"tiny-{family}")


@pytest.mark.parametrize("family", list(LAYER_CALLS))
@torch.no_grad()
def test_layer_by_layer_gives_the_models_own_logits(family, one_thread):
    """capture_layer_inputs + run_layer over every layer + head_logits == the model's forward, on micro-batches of
    2 and 1 sequences of 32 tokens (longer than the sliding windows)."""
    changes, per_layer = LAYER_CALLS[family]
    dense = _tiny_with(family, changes)
    want = dense.model(input_ids=LONG_IDS, use_cache=False).logits  # (3, 32, V)
    inputs = capture_layer_inputs(dense, LONG_IDS, batch_size=2)
    got = torch.cat(_layer_by_layer(dense, LONG_IDS, 2, inputs))
    assert got.shape == want.shape and float((got - want).abs().max()) <= DENSE_TOL
    first, second = inputs.calls[0][0][1], inputs.calls[1][0][1]
    for key, value in second.items():  # what the layers share is kept once, not copied per layer
        same = isinstance(value, torch.Tensor) and isinstance(first.get(key), torch.Tensor)
        if same and value.shape == first[key].shape and torch.equal(value, first[key]):
            assert value is first[key], key
    if per_layer:  # the test can fail: layer 0's arguments given to layer 1 change the logits, or fail
        inputs.calls[1] = inputs.calls[0]
        try:
            reused = torch.cat(_layer_by_layer(dense, LONG_IDS, 2, inputs))
        except (TypeError, ValueError, RuntimeError):
            return
        assert float((reused - want).abs().max()) > 1e-3


def test_a_forward_that_changes_the_hidden_state_between_layers_is_refused():
    """Run one layer at a time, a loop that rescales the hidden state between its layers would be silently
    wrong: the capture says so instead."""
    from moe_core.model_io import ArchAdapter

    class Rescaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(260, 8)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

        def forward(self, input_ids, use_cache=False):
            h = self.embed(input_ids)
            for layer in self.layers:
                h = 2 * layer(h)
            return h

    dense = DenseModel(Rescaled(), None, ArchAdapter("Toy", "toy", False, layers_path="layers"), "toy")
    with pytest.raises(ValueError, match="changes the hidden state between its decoder layers"):
        capture_layer_inputs(dense, LONG_IDS, batch_size=2)
