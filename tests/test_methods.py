"""The method registry: one table that every method (moe_core.methods.METHODS) passes through the run config,
the command line, the Convert tab and the model card. A new method module is in this table by being there."""

from __future__ import annotations

import shlex
from dataclasses import replace

import pytest

from moe_core.cli import _run_config, build_parser, convert_overrides
from moe_core.config import ConvertRun, from_dict, load_config_file, to_dict
from moe_core.methods import METHODS, Layout, lookup
from moe_core.pipeline import command_line, config_yaml

NAMES = list(METHODS)


def test_the_registry_finds_every_method_module():
    import pkgutil

    import moe_core.methods as package

    modules = {m.name for m in pkgutil.iter_modules(package.__path__)}
    assert {"cmoe", "ladimo", "dive"} <= set(NAMES) and set(NAMES) <= modules
    assert NAMES[0] == "cmoe"  # the default method comes first in menus
    with pytest.raises(ValueError, match="Unknown conversion method 'nope'. Methods: cmoe"):
        lookup("nope")


@pytest.mark.parametrize("name", NAMES)
def test_a_run_config_has_the_method_section(name):
    entry = METHODS[name]
    cfg = ConvertRun(method=name)
    assert isinstance(cfg.section(), entry.config) and cfg.section() == entry.config()
    assert from_dict(ConvertRun, to_dict(cfg)) == cfg  # JSON round trip
    with pytest.raises(ValueError, match=f"Unknown {entry.config.__name__} field"):
        from_dict(ConvertRun, {"method": name, name: {"no_such_field": 1}})


@pytest.mark.parametrize("name", NAMES)
def test_every_flag_of_a_method_reaches_its_section_and_the_command_line_reproduces_it(name, tmp_path):
    """The command line the app shows for a method's default run parses back to that run (through --config
    when its flags do not express every setting)."""
    cfg = replace(ConvertRun(method=name), model=replace(ConvertRun().model, spec="builtin:tiny-llama"))
    (tmp_path / "run_config.yaml").write_text(config_yaml(cfg))
    line = command_line(cfg, str(tmp_path / "run_config.yaml"))
    argv = shlex.split(line)
    args = build_parser().parse_args(argv[3:])
    assert _run_config(ConvertRun, args, convert_overrides(args, name)) == cfg
    for option in METHODS[name].options:
        if option.flag:
            value = option.get(cfg.section())
            off = value is None or (option.kind is bool and not value)  # a switch that is off is left out
            assert option.flag in line or off, option.flag


def test_a_flag_fills_only_the_run_methods_section():
    args = build_parser().parse_args(["convert", "--method", "dive", "--prune-ratio", "0.4", "--top-k", "2"])
    assert convert_overrides(args, "dive")["dive"] == {"prune_ratio": 0.4, "top_k": 2}
    with pytest.warns(UserWarning, match="--prune-ratio is an option of DIVE"):
        assert convert_overrides(args, "ladimo")["ladimo"] == {"top_k": 2}  # --top-k is LaDiMo's too


@pytest.mark.parametrize("name", NAMES)
def test_the_design_layout_maps_onto_every_method(name):
    """From the Design tab's S1A1E2 (shared ratio 0.5) each method takes what its section holds (two experts:
    DIVE's default domains make two groups on any machine, six with the shared data)."""
    entry = METHODS[name]
    layout = Layout(n_experts=2, n_shared=1, active=1, shared_ratio=0.5)
    values = entry.from_layout(layout)
    cfg = from_dict(ConvertRun, {"method": name, name: values})
    if entry.to_layout is not None:
        n_experts, active, ratio = entry.to_layout(cfg.section())
        assert (n_experts, active) == (2, 1) and ratio == pytest.approx(0.5)
    text = entry.layout_text(to_dict(cfg)[name])
    assert text and "None" not in text


def test_only_methods_that_take_a_budget_accept_the_budget_mode():
    budgeted = [n for n, m in METHODS.items() if m.budget]
    assert budgeted == ["cmoe"]
    layout = Layout(8, 2, 2, 0.25, budget=0.5, layer_experts=("S2A1E8", "dense"))
    assert METHODS["cmoe"].from_layout(layout)["layer_experts"] == ("S2A1E8", "dense")


@pytest.mark.parametrize("name", NAMES)
def test_the_model_card_cites_the_methods_paper(name):
    from moe_core.export.card import provenance
    from moe_core.export.config import ExportConfig
    from moe_core.model_io import ConvertedModel

    moe = ConvertedModel(None, None, None, "builtin:tiny-llama")  # no report: the run config names the method
    meta = provenance(moe, ExportConfig(), None, None, to_dict(ConvertRun(method=name)), {})
    assert meta["method"] == name and meta["paper"] == METHODS[name].paper and "arXiv" in meta["paper"]


@pytest.mark.parametrize("name", NAMES)
def test_a_yaml_run_config_names_the_method(name, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(config_yaml(ConvertRun(method=name)))
    assert from_dict(ConvertRun, load_config_file(path)) == ConvertRun(method=name)
