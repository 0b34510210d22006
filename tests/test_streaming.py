"""Streaming conversion (moe_core.streaming): a model folder converted one decoder layer at a time, never whole
in memory, gives the in-memory conversion's checkpoint exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_core.checkpoint import load_converted
from moe_core.cli import main
from moe_core.config import ConvertRun, from_dict
from moe_core.model_io import load_model
from moe_core.pipeline import convert_run
from moe_core.streaming import LayerStream, ShardReader, ShardWriter, open_model, parse_bytes

DATA = {"text": "builtin:pydoc", "n_sequences": 4, "seq_len": 32}


def _folder(tmp_path_factory, spec: str):
    """A bf16 save_pretrained folder of a tiny model, in several shards (as hub checkpoints come); "+tied" ties
    its LM head to the embedding first, so the folder holds no head of its own (SmolLM2's case)."""
    spec, _, tied = spec.partition("+")
    dense = load_model(spec)
    if tied:
        dense.model.config.tie_word_embeddings = True
        dense.model.lm_head.weight = dense.model.get_input_embeddings().weight
    folder = tmp_path_factory.mktemp(spec.split(":")[1])
    dense.model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")
    dense.tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 1
    from moe_core.streaming import ShardReader

    assert ("lm_head.weight" in ShardReader(folder)) != bool(tied)
    return folder


@pytest.fixture(
    scope="module", params=["builtin:tiny-llama", "builtin:tiny-qwen2", "builtin:tiny-llama+tied"]
)
def source(request, tmp_path_factory):
    return _folder(tmp_path_factory, request.param)


def _run(folder, **changes) -> ConvertRun:
    tree = {"model": {"spec": str(folder), "max_memory": "10KB"}, "data": DATA, "cmoe": {"experts": "S1A2E4"}}
    tree["distill"] = {"enabled": False}  # on by default, and it trains through the whole model
    return from_dict(ConvertRun, tree | changes)


def _cli(command: str, source) -> list[str]:
    """A command line on ``source`` with the tests' tiny calibration (2 x 32 tokens of Python's docs)."""
    return [
        command,
        "--model",
        str(source),
        "--text",
        "builtin:pydoc",
        "--n-sequences",
        "2",
        "--seq-len",
        "32",
    ]


@torch.no_grad()
def test_streaming_gives_the_in_memory_conversion_exactly(source, tmp_path):
    cfg = _run(source)
    in_memory = convert_run(load_model(str(source)), cfg, folder=tmp_path / "mem")
    opened = open_model(source)
    streamed = convert_run(opened.dense, cfg, folder=tmp_path / "stream", source=opened)
    assert streamed.metrics["streamed"] and (tmp_path / "stream" / "model.safetensors.index.json").is_file()
    a, b = load_converted(tmp_path / "mem"), load_converted(tmp_path / "stream")
    x = in_memory.calib_ids[:2]
    torch.testing.assert_close(a.model(x).logits, b.model(x).logits, rtol=0, atol=0)
    for name, tensor in a.model.state_dict().items():
        torch.testing.assert_close(tensor, b.model.state_dict()[name], rtol=0, atol=0, msg=name)
    keys = ("active_ffn_share", "total_params", "active_params", "moe_layers")
    assert {k: in_memory.metrics[k] for k in keys} == {k: streamed.metrics[k] for k in keys}


@torch.no_grad()
def test_activations_larger_than_an_eighth_of_max_memory_go_to_disk_and_change_nothing(
    source, tmp_path, monkeypatch
):
    """A streamed conversion whose calibration hidden states pass an eighth of --max-memory keeps them on disk (one
    file per micro-batch, read back one at a time) and gives the same checkpoint; the files go with the run."""
    import moe_core.layerwise as lw

    stores, reads = [], []
    real_init, real_get = lw.SpilledStates.__init__, lw.SpilledStates.__getitem__

    def spy_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        stores.append(self._tmp.name)

    def spy_get(self, i):
        reads.append(i)
        return real_get(self, i)

    monkeypatch.setattr(lw.SpilledStates, "__init__", spy_init)
    monkeypatch.setattr(lw.SpilledStates, "__getitem__", spy_get)
    cfg = _run(source, cmoe={"experts": "S1A2E4", "batch_size": 1})
    in_memory = convert_run(load_model(str(source)), cfg, folder=tmp_path / "mem")
    assert not stores  # nothing streams in memory
    roomy = open_model(source, max_memory="1GB")
    convert_run(roomy.dense, cfg, folder=tmp_path / "roomy", source=roomy)
    assert not stores  # 4 x 32 tokens' states are far below an eighth of 1 GB
    opened = open_model(source, max_memory="10KB")
    streamed = convert_run(opened.dense, cfg, folder=tmp_path / "stream", source=opened)
    n_layers = load_model(str(source)).n_layers
    # the captured states, then each layer's outputs but the last's (nothing runs after the last target)
    assert len(stores) == n_layers
    assert len(reads) >= 4 * n_layers  # every micro-batch of 1 window read back for every layer
    import gc

    gc.collect()
    assert not any(Path(d).exists() for d in stores)
    a, b = load_converted(tmp_path / "mem"), load_converted(tmp_path / "stream")
    for name, tensor in a.model.state_dict().items():
        torch.testing.assert_close(tensor, b.model.state_dict()[name], rtol=0, atol=0, msg=name)
    assert in_memory.metrics["active_ffn_share"] == streamed.metrics["active_ffn_share"]


@torch.no_grad()
def test_a_per_layer_budget_streams_its_sensitivity_and_gives_the_in_memory_allocation_exactly(
    source, tmp_path, monkeypatch
):
    """The budget's sensitivity pass walks the layers once (every held-out set goes through layer i, then layer
    i + 1), so a streamed source is read twice (the measurement, then the conversion), never whole, and gives the
    in-memory KL table, allocation and checkpoint exactly; its held-out states in flight spill under a tight budget."""
    import moe_core.layerwise as lw

    loads, stores = [], []
    real_load, real_init = LayerStream.load, lw.SpilledStates.__init__
    monkeypatch.setattr(
        LayerStream, "load", lambda self, dense, i: (loads.append(i), real_load(self, dense, i))[1]
    )

    def spy_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        stores.append(self)

    monkeypatch.setattr(lw.SpilledStates, "__init__", spy_init)
    # the partition carving: on these tiny models token-cut experts make S1A1E4 best everywhere (one shape)
    cmoe = {"experts": "S1A2E4", "budget": 0.6, "sensitivity": "full", "cluster_on": "magnitude"}
    cfg = _run(source, cmoe=cmoe)
    in_memory = convert_run(load_model(str(source)), cfg, folder=tmp_path / "mem")
    assert not loads and not stores
    opened = open_model(source, max_memory="10KB")
    streamed = convert_run(opened.dense, cfg, folder=tmp_path / "stream", source=opened)
    n_layers = load_model(str(source)).n_layers
    assert loads == list(range(n_layers)) * 2  # the sensitivity pass, then the conversion
    assert stores  # 10 KB: the held-out windows' states in flight went to disk
    a, b = in_memory.metrics["budget"], streamed.metrics["budget"]
    assert a["sensitivity"]["kl"] == b["sensitivity"]["kl"] and a["layer_experts"] == b["layer_experts"]
    assert len(set(a["layer_experts"])) > 1  # the budget gave the layers different shapes
    assert all(p.is_meta for p in opened.dense.model.model.layers.parameters())
    x, y = load_converted(tmp_path / "mem"), load_converted(tmp_path / "stream")
    for name, tensor in x.model.state_dict().items():
        torch.testing.assert_close(tensor, y.model.state_dict()[name], rtol=0, atol=0, msg=name)


@torch.no_grad()
def test_dive_without_retraining_streams_and_gives_the_in_memory_conversion_exactly(
    source, tmp_path, monkeypatch
):
    """DIVE's statistics (one walk per domain), mining (one walk per pruning domain, every held-out window through
    layer i, then i + 1) and experts (assembled and routed in the conversion's walk) all stream."""
    loads = []
    real_load = LayerStream.load
    monkeypatch.setattr(
        LayerStream, "load", lambda self, dense, i: (loads.append(i), real_load(self, dense, i))[1]
    )
    dive = {
        "domains": [["pydoc", "builtin:pydoc"], ["stdlib", "builtin:stdlib"]], "n_experts": 2, "n_sequences": 2,
        "seq_len": 32, "max_chars": 20000, "retrain": {"stage1_steps": 0, "stage2_steps": 0},
    }  # fmt: skip
    cfg = _run(source, method="dive", dive=dive)
    in_memory = convert_run(load_model(str(source)), cfg, folder=tmp_path / "mem")
    opened = open_model(source)
    streamed = convert_run(opened.dense, cfg, folder=tmp_path / "stream", source=opened)
    n_layers = load_model(str(source)).n_layers
    assert loads == list(range(n_layers)) * 5  # statistics of 2 domains, mining pruned on each, the experts
    a, b = in_memory.metrics["conversion"], streamed.metrics["conversion"]
    assert a["affinity"] == b["affinity"] and len(b["routing"]) == n_layers
    x, y = load_converted(tmp_path / "mem"), load_converted(tmp_path / "stream")
    for name, tensor in x.model.state_dict().items():
        torch.testing.assert_close(tensor, y.model.state_dict()[name], rtol=0, atol=0, msg=name)


@torch.no_grad()
def test_flap_streams_and_gives_the_in_memory_conversion_exactly(source, tmp_path, monkeypatch):
    """FLAP's statistics are a walk of their own over the dense layers; pruning and the refit run in the
    conversion's walk."""
    loads = []
    real_load = LayerStream.load
    monkeypatch.setattr(
        LayerStream, "load", lambda self, dense, i: (loads.append(i), real_load(self, dense, i))[1]
    )
    cfg = _run(source, method="flap", flap={"prune_ratio": 0.5})
    in_memory = convert_run(load_model(str(source)), cfg, folder=tmp_path / "mem")
    opened = open_model(source)
    streamed = convert_run(opened.dense, cfg, folder=tmp_path / "stream", source=opened)
    n_layers = load_model(str(source)).n_layers
    assert loads == list(range(n_layers)) * 2  # the statistics, then the pruned layers
    assert streamed.metrics["streamed"] and len(streamed.metrics["conversion"]["routing"]) == n_layers
    assert streamed.metrics["active_ffn_share"] == in_memory.metrics["active_ffn_share"]
    a, b = load_converted(tmp_path / "mem"), load_converted(tmp_path / "stream")
    for name, tensor in a.model.state_dict().items():
        torch.testing.assert_close(tensor, b.model.state_dict()[name], rtol=0, atol=0, msg=name)


@torch.no_grad()
def test_ladimo_streams_and_gives_the_in_memory_conversion_exactly(source, tmp_path):
    """LaDiMo trains each layer and runs its routing step inside the one layer loop, so it streams too."""
    ladimo = {"n_experts": 4, "n_shared": 1, "top_k": 2, "steps": 5, "batch_tokens": 32}
    cfg = _run(source, method="ladimo", ladimo=ladimo)
    in_memory = convert_run(load_model(str(source)), cfg, folder=tmp_path / "mem")
    opened = open_model(source)
    streamed = convert_run(opened.dense, cfg, folder=tmp_path / "stream", source=opened)
    assert streamed.metrics["streamed"] and all(
        "routing_step" in info for info in streamed.metrics["conversion"]["layers"]
    )
    a, b = load_converted(tmp_path / "mem"), load_converted(tmp_path / "stream")
    for name, tensor in a.model.state_dict().items():
        torch.testing.assert_close(tensor, b.model.state_dict()[name], rtol=0, atol=0, msg=name)
    x = in_memory.calib_ids[:2]
    torch.testing.assert_close(a.model(x).logits, b.model(x).logits, rtol=0, atol=0)


def test_at_most_one_decoder_layer_is_ever_in_memory(source, tmp_path, monkeypatch):
    """Count the decoder layers holding real weights each time one is read: never more than the one read."""
    opened = open_model(source)
    layers = opened.dense.adapter.layers
    seen = []
    load = LayerStream.load

    def counting(self, dense, i):
        load(self, dense, i)
        real = [j for j, layer in enumerate(layers(dense.model)) if not next(layer.parameters()).is_meta]
        seen.append(real)

    monkeypatch.setattr(LayerStream, "load", counting)
    assert all(next(layer.parameters()).is_meta for layer in layers(opened.dense.model))
    head = opened.dense.model.get_output_embeddings()
    assert opened.tied or head.weight.is_meta  # an untied LM head is never read into the model
    convert_run(opened.dense, _run(source), folder=tmp_path / "out", source=opened)
    assert seen == [[i] for i in range(opened.dense.n_layers)]


def test_a_streamed_layers_dense_mlp_is_freed_before_its_routing_step(source, tmp_path, monkeypatch):
    """The routing step's refit is a layer's largest allocation: the dense MLP it was carved from (whose outputs
    it already has) must not be alive beside it."""
    import gc
    import weakref

    from moe_core.methods import cmoe

    opened, dense_mlps, alive = open_model(source), {}, []
    carve, reconstruct = cmoe.carve_block, cmoe.reconstruct_block

    def carving(dense, i, *args, **kwargs):
        dense_mlps[i] = weakref.ref(dense.mlp(i))
        return carve(dense, i, *args, **kwargs)

    def routing(block, x, y, settings, layer=0):
        gc.collect()
        alive.append(dense_mlps[layer]() is not None)
        return reconstruct(block, x, y, settings, layer=layer)

    monkeypatch.setattr(cmoe, "carve_block", carving)
    monkeypatch.setattr(cmoe, "reconstruct_block", routing)
    convert_run(opened.dense, _run(source), folder=tmp_path / "out", source=opened)
    assert alive == [False] * opened.dense.n_layers


def test_the_command_line_streams_a_folder_larger_than_max_memory(source, tmp_path, capsys):
    argv = [*_cli("convert", source), "--no-distill"]
    assert main([*argv, "--experts", "S1A2E4", "--max-memory", "10KB", "--out", str(tmp_path / "s")]) == 0
    assert main([*argv, "--experts", "S1A2E4", "--max-memory", "1GB", "--out", str(tmp_path / "m")]) == 0
    streamed = json.loads((tmp_path / "s" / "metrics.json").read_text())
    in_memory = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert streamed.get("streamed") is True and "streamed" not in in_memory
    run = json.loads((tmp_path / "s" / "run_config.json").read_text())
    assert run["model"]["max_memory"] == "10KB"
    capsys.readouterr()


def test_profiling_streams_a_folder_larger_than_max_memory(source, tmp_path, monkeypatch, capsys):
    """`profile --max-memory` reads one decoder layer at a time (through the same driver) and gives the profile
    the whole model gives."""
    from moe_core.profiling import ActivationProfile

    loads = []
    real = LayerStream.load
    monkeypatch.setattr(
        LayerStream, "load", lambda self, dense, i: (loads.append(i), real(self, dense, i))[1]
    )
    argv = _cli("profile", source)
    assert main([*argv, "--max-memory", "10KB", "--out", str(tmp_path / "s")]) == 0
    n_layers = load_model(str(source)).n_layers
    assert loads == list(range(n_layers))  # every layer read from the shards, once, in order
    assert main([*argv, "--max-memory", "1GB", "--out", str(tmp_path / "m")]) == 0
    assert loads == list(range(n_layers))  # in memory: nothing streamed
    a, b = ActivationProfile.load(tmp_path / "s"), ActivationProfile.load(tmp_path / "m")
    torch.testing.assert_close(a.rates, b.rates, rtol=0, atol=0)
    torch.testing.assert_close(a.mean_abs, b.mean_abs, rtol=0, atol=0)
    capsys.readouterr()


def test_evaluation_streams_a_folder_larger_than_max_memory(source, tmp_path, monkeypatch, capsys):
    """`eval --max-memory` scores a converted folder (and its dense source, the reference) one decoder layer at a
    time, each read once, all windows through a layer before the next, and reports what in memory reports."""
    converted = tmp_path / "moe"
    assert (
        main([*_cli("convert", source), "--no-distill", "--experts", "S1A2E4", "--out", str(converted)]) == 0
    )
    loads = []
    real = LayerStream.load
    monkeypatch.setattr(
        LayerStream, "load", lambda self, dense, i: (loads.append(i), real(self, dense, i))[1]
    )
    scored = ["--text", "builtin:pydoc", "--seq-len", "16", "--windows", "3", "--no-speed"]
    reports = {}
    for limit in ("10KB", "1GB"):
        out = tmp_path / f"eval-{limit}"
        assert (
            main(["eval", "--model", str(converted), *scored, "--max-memory", limit, "--out", str(out)]) == 0
        )
        reports[limit] = json.loads((out / "metrics.json").read_text())
    n_layers = load_model(str(source)).n_layers
    assert loads == list(range(n_layers)) * 2  # the reference (the dense source), then the converted model
    streamed, in_memory = reports["10KB"], reports["1GB"]
    assert streamed["streamed"] is True and in_memory["streamed"] is False
    for key in ("ppl", "ppl_ref", "kl", "agreement"):
        assert streamed[key] == pytest.approx(in_memory[key], rel=1e-4, abs=1e-6), key
    assert streamed["expert_load"] == in_memory["expert_load"]
    capsys.readouterr()
    tasks = ["--tasks", "arc_easy_local"]
    assert main(["eval", "--model", str(converted), *scored, "--max-memory", "10KB", *tasks]) == 2
    assert "lm-eval tasks run the whole model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"method": "dive"}, "DIVE's two retraining stages train through the whole model"),
        ({"distill": {"enabled": True}}, "and fine-tuning train through the whole model"),
    ],
)
def test_what_cannot_stream_is_refused_before_anything_is_read(source, tmp_path, changes, reason):
    opened = open_model(source)
    with pytest.raises(ValueError, match=reason):
        convert_run(opened.dense, _run(source, **changes), folder=tmp_path / "x", source=opened)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """The source converted by streaming, in the native routing form (each layer's routing exact in Qwen2-MoE)."""
    folder = tmp_path_factory.mktemp("converted") / "conv"
    opened = open_model(source)
    convert_run(opened.dense, _run(source, routing={"form": "native"}), folder=folder, source=opened)
    return folder


def _gguf_tensors(folder) -> dict:
    import gguf

    (path,) = folder.glob("*.gguf")
    return {t.name: t.data for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("fmt", ["portable", "exact", "llamacpp", "gguf"])
def test_a_streamed_export_writes_the_in_memory_exports_tensors(converted, tmp_path, fmt, monkeypatch):
    """Exported one decoder layer at a time, never more than one in the model: the in-memory export's tensors
    exactly, and (Qwen2-MoE layouts) a layer-by-layer fidelity equal to the whole export reloaded in a clean
    process."""
    from moe_core.export import ExportConfig, export_model, verify
    from moe_core.export.streamed import export_streamed

    seen, load = [], LayerStream.load

    def counting(self, dense, i):
        load(self, dense, i)
        layers = dense.adapter.layers(dense.model)
        seen.append([j for j, layer in enumerate(layers) if not next(layer.parameters()).is_meta])

    monkeypatch.setattr(LayerStream, "load", counting)
    streamed = export_streamed(converted, tmp_path / "s", ExportConfig(format=fmt))
    moe = load_converted(converted)
    assert seen == ([] if fmt == "exact" else [[i] for i in range(moe.n_layers)])
    export_model(moe, tmp_path / "m", ExportConfig(format=fmt, verify=False))
    assert "one decoder layer at a time" in (tmp_path / "s" / "README.md").read_text()
    if fmt == "gguf":
        a, b = _gguf_tensors(tmp_path / "s"), _gguf_tensors(tmp_path / "m")
        assert set(a) == set(b) and all(np.array_equal(a[n], b[n]) for n in a)
        assert streamed.gguf["ok"] and streamed.fidelity["max_abs_logit_diff"] <= 1e-4  # the f32 layout
        assert (
            not streamed.fidelity["identical"] and "float32 layout" in streamed.fidelity["measured_on"]
        )  # f16
        return
    a, b = ShardReader(tmp_path / "s"), ShardReader(tmp_path / "m")
    assert set(a.files) == set(b.files) and len(a.files) > 1
    for name in a.files:
        assert torch.equal(a.get(name), b.get(name)), name
    reloaded = verify(moe, [(tmp_path / "s", fmt == "exact")])[0]
    assert reloaded["identical"] and reloaded["generation_match"] and streamed.fidelity["identical"]
    if fmt == "exact":
        assert streamed.fidelity["check"] == "structure" and streamed.fidelity["tensors"] == len(a.files)
        return
    for key in ("max_abs_logit_diff", "kl", "top1_agreement", "ppl_internal", "ppl_export"):
        assert streamed.fidelity[key] == pytest.approx(reloaded[key], rel=1e-4, abs=1e-6), key


def test_what_a_streamed_export_cannot_write_is_refused_with_what_would(source, converted, tmp_path, capsys):
    from moe_core.export import ExportConfig, ExportError
    from moe_core.export.streamed import export_streamed

    # the default routing form is approximated in Qwen2-MoE: its routers are fitted on the whole model
    analytic = tmp_path / "analytic"
    opened = open_model(source)
    convert_run(opened.dense, _run(source), folder=analytic, source=opened)
    with pytest.raises(ExportError, match="no exact Qwen2-MoE form.*--routing-form native"):
        export_streamed(analytic, tmp_path / "x", ExportConfig(format="portable"))
    with pytest.raises(ExportError, match="is not a converted folder"):
        export_streamed(source, tmp_path / "x", ExportConfig(format="exact"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    argv = ["export", "--model", str(converted), "--max-memory", "10KB", "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert printed["identical"] is True and metrics["fidelity"]["streamed"] is True


def test_memory_sizes_parse_and_bad_ones_say_how_to_write_them():
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1.5 GiB") == int(1.5 * 2**30)
    assert parse_bytes("800mb") == 800 * 10**6 and parse_bytes(None) is None
    with pytest.raises(ValueError, match="write it like 2GB"):
        parse_bytes("two gigs")
    with pytest.raises(ValueError, match="write it like 2GB"):
        from_dict(ConvertRun, {"model": {"max_memory": "lots"}})


def test_shards_close_at_their_size_and_the_index_names_every_tensor(tmp_path):
    writer = ShardWriter(tmp_path, {"format": "test"}, shard_bytes=1000)
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    for name, tensor in tensors.items():
        writer.add({name: tensor})
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{k}-of-00002.safetensors" for k in (1, 2)]
    reader = ShardReader(tmp_path)
    for name, tensor in tensors.items():
        torch.testing.assert_close(reader.get(name), tensor)


def test_the_app_streams_a_folder_larger_than_its_max_memory(tmp_path_factory):
    """The Model tab's max memory: the folder is opened, not loaded; Profile, Design's sensitivity, Convert and
    Evaluate read one decoder layer at a time and give what the in-memory session gives; what needs the whole model says so."""
    import gradio as gr
    from test_views import DATA, DESIGN, layout, options

    from views import compare_tab, convert_tab, design_tab, evaluate_tab, export_tab, model_tab, profile_tab
    from views.state import Session, Workspace

    folder = _folder(tmp_path_factory, "builtin:tiny-llama")
    sessions, profiles, evals, measured = {}, {}, {}, {}
    budget = layout(8, 0.25, "budget", 2, "", 0.5, "")
    no_distill = options(**{"distill.enabled": False})
    for limit in ("10KB", ""):
        fresh = Session(workspace=Workspace(tmp_path_factory.mktemp("app")))
        session, card = model_tab.load(str(folder), "cpu", False, fresh, limit)
        assert (session.source is not None) == bool(limit) and ("Streamed" in card) == bool(limit)
        session = profile_tab.run(session, "builtin:pydoc", 2, 32, 5, 0, 0)[0]
        profiles[limit] = session.profile
        session, allocation = design_tab.measure(
            session, lambda s=session: convert_tab.cmoe_run(s, DATA, budget, ["cmoe", *no_distill]), budget
        )[:2]
        measured[limit] = (session.sensitivity.kl, allocation)
        if limit:  # distillation (on by default) needs the whole model
            with pytest.raises(gr.Error, match="turn distillation off"):
                list(
                    convert_tab.convert(
                        session, *DATA, *DESIGN[:2], "budget", *DESIGN[3:], "cmoe", *options()
                    )
                )
        session = list(convert_tab.convert(session, *DATA, *DESIGN, "cmoe", *no_distill))[-1][0]
        session = evaluate_tab.run(session, "builtin:pydoc", 2, 16, [], 5)[0]
        sessions[limit], evals[limit] = session, session.evals[-1]
    streamed = sessions["10KB"]
    assert all(p.is_meta for layer in streamed.dense.model.model.layers for p in layer.parameters())
    assert json.loads((streamed.workspace.path("converted") / "metrics.json").read_text())["streamed"] is True
    torch.testing.assert_close(profiles["10KB"].rates, profiles[""].rates, rtol=0, atol=0)
    assert measured["10KB"] == measured[""]  # the Design tab's sensitivity streams too
    for key in ("ppl", "kl", "agreement"):
        assert evals["10KB"][key] == pytest.approx(evals[""][key], rel=1e-4, abs=1e-6), key
    with pytest.raises(gr.Error, match="larger than the Model tab's max memory"):
        compare_tab.run(streamed, "Hello", 4)
    for tab in (
        convert_tab,
        evaluate_tab,
        compare_tab,
        export_tab,
    ):  # after a streamed conversion (blocks on meta)
        assert tab.status_text(streamed)
    assert "one decoder layer at a time" in export_tab.status_text(streamed)
    exported, shown = export_tab.build_export(streamed, "exact", True)[:2]
    assert exported.export.fidelity["streamed"] and "one decoder layer at a time" in shown
    for fmt in ("portable", "gguf"):  # the default routing form is approximated in Qwen2-MoE
        with pytest.raises(gr.Error, match="routing-form native"):
            export_tab.build_export(streamed, fmt, True)
