"""The web app: tab handlers without a server, one in-process server driven by gradio_client, and the
boundary that keeps gradio out of moe_core."""

from __future__ import annotations

import shlex
import subprocess
import sys
import urllib.request

import gradio as gr
import numpy as np
import plotly.graph_objects as go
import pytest

from moe_core.cli import build_parser
from views import model_tab, plots, profile_tab
from views.state import Session

TINY = "builtin:tiny-llama"  # 2 layers, H=64, I=192, random weights, byte tokenizer: instant


@pytest.fixture(scope="module")
def loaded() -> Session:
    session, _ = model_tab.load(TINY, "cpu", False, Session())
    return session


@pytest.fixture(scope="module")
def profiled(loaded) -> tuple:
    return profile_tab.run(loaded, "builtin:pydoc", 2, 32, 5, 0, 1)


def test_moe_core_never_imports_gradio():
    """Every module of the package (walked with pkgutil, so a new one is covered too), in a fresh process."""
    code = (
        "import importlib, pkgutil, sys, moe_core\n"
        "names = [m.name for m in pkgutil.walk_packages(moe_core.__path__, 'moe_core.')]\n"
        "assert len(names) > 20 and 'moe_core.export.card' in names, names\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "    assert 'gradio' not in sys.modules, f'{name} imported gradio'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_load_puts_the_model_in_the_session_and_summarises_it(loaded):
    assert loaded.dense is not None and loaded.dense.spec == TINY and loaded.profile is None
    html = model_tab.summary_html(TINY, loaded.dense.summary())
    assert "decoder layers" in html and ">192<" in html and ">64<" in html and TINY in html


def test_load_error_is_a_message_not_a_traceback(tmp_path):
    with pytest.raises(gr.Error, match="no config.json") as info:
        model_tab.load(str(tmp_path), "cpu", False, Session())
    assert "Traceback" not in str(info.value)


def test_loading_a_new_model_drops_the_old_profile(profiled):
    session = profiled[0]
    assert session.profile is not None
    again, _ = model_tab.load(TINY, "cpu", False, session)
    assert again.profile is None and again.cancel is session.cancel


def test_profile_fills_the_session_and_draws_every_chart(profiled):
    session, summary, preview, slider, heat, rate, h = profiled
    assert tuple(session.profile.rates.shape) == (2, 192) and session.profile.n_tokens == 64
    assert "tokens profiled (2 x 32)" in summary and ">64<" in summary and "builtin:pydoc" in summary
    assert preview.strip() and slider.maximum == 1 and slider.value == 1
    assert all(isinstance(f, go.Figure) for f in (heat, rate, h))
    assert rate.data[0].y.sum() == 192  # every neuron of the layer is in one bin
    assert "Layer 1" in rate.layout.title.text and "Layer 1" in h.layout.title.text


def test_changing_the_layer_replots_from_the_stored_profile(profiled):
    session = profiled[0]
    rates_before = session.profile.rates.clone()
    rate, h = profile_tab.layer_figures(session, 0)
    assert "Layer 0" in rate.layout.title.text and "Layer 0" in h.layout.title.text
    assert session.profile.rates.equal(rates_before)
    rate_again, _ = profile_tab.layer_figures(session, 0)
    assert np.array_equal(rate.data[0].y, rate_again.data[0].y)


def test_profile_needs_a_model_first():
    with pytest.raises(gr.Error, match="Load a model in the Model tab first"):
        profile_tab.run(Session(), "builtin:pydoc", 2, 32, 5, 0, 0)


@pytest.mark.parametrize(
    ("text", "n", "seq_len", "k_act", "match"),
    [
        ("shared:nope", 2, 32, 5, "Unknown shared text source"),
        ("builtin:pydoc", 2, 32, 0, "k_act must be >= 1"),
        ("builtin:pydoc", 0, 32, 5, "n_sequences must be"),
        ("builtin:pydoc", 2, 32, 500, "K_a must be between 1 and the intermediate size"),
    ],
)
def test_bad_profile_inputs_are_explained(loaded, text, n, seq_len, k_act, match):
    with pytest.raises(gr.Error, match=match):
        profile_tab.run(loaded, text, n, seq_len, k_act, 0, 0)


def test_cancel_keeps_the_previous_profile(loaded):
    def progress(fraction, desc=None):
        if fraction > 0:  # the first layer is done: press Cancel
            loaded.cancel.set()

    with pytest.warns(UserWarning, match="cancelled"):
        out = profile_tab.run(loaded, "builtin:pydoc", 2, 32, 5, 0, 0, progress=progress)
    assert len(out) == 7 and all(isinstance(o, type(gr.skip())) for o in out)


def test_command_line_preview_is_a_valid_cli_call(loaded):
    line = profile_tab.command(loaded, "shared:wikitext2", 4.0, 256.0, 10, 0)
    argv = shlex.split(line)
    assert argv[:4] == ["python", "-m", "moe_core", "profile"]
    args = build_parser().parse_args(argv[3:])
    assert (args.model, args.text, args.n_sequences, args.seq_len, args.k_act) == (
        TINY,
        "shared:wikitext2",
        4,
        256,
        10,
    )


def test_log_rate_bins_count_every_neuron_once():
    rates = np.array([[0.0, 0.0, 0.1, 0.2, 0.5, 1.0], [0.2, 0.2, 0.2, 0.2, 0.2, 0.0]])  # 10 tokens
    counts, x = plots.log_rate_bins(rates, n_tokens=10, n_bins=5)
    # bins by tokens hit: 0 | 1 | 2 | 3 | 4-6 | 7-10
    assert counts.tolist() == [[2, 1, 1, 0, 1, 1], [1, 0, 5, 0, 0, 0]]
    assert x.shape == (6,) and np.all(np.diff(x) > 0) and np.isclose(x[1], np.log10(0.1))


def test_server_load_and_profile_over_the_api(server_url):
    from gradio_client import Client

    with urllib.request.urlopen(server_url, timeout=30) as page:
        assert page.status == 200 and "MoE Studio" in page.read().decode()
    client = Client(server_url, verbose=False)  # one client = one session: the state carries over
    summary_html = client.predict(TINY, "cpu", False, api_name="/load_model")
    assert "decoder layers" in summary_html
    summary, preview, layer, heat, rate, h = client.predict(
        "builtin:pydoc", 2, 32, 5, 0, 1, api_name="/profile"
    )
    assert "tokens profiled" in summary and preview.strip()
    assert layer["maximum"] == 1 and layer["value"] == 1  # a slider update arrives as a dict
    assert all(p is not None for p in (heat, rate, h))
    rate0, _ = client.predict(0, 8, 0.25, api_name="/show_layer")
    assert "Layer 0" in str(rate0) and "shared | routed" in str(rate0)
    with pytest.raises(Exception, match="no config.json|Could not"):
        Client(server_url, verbose=False).predict("/", "cpu", False, api_name="/load_model")


@pytest.mark.slow
def test_default_model_summary(smollm2):
    html = model_tab.summary_html(smollm2.spec, smollm2.summary())
    assert ">30<" in html and ">576<" in html and ">1536<" in html


def test_server_convert_export_and_separate_sessions(server_url):
    from gradio_client import Client
    from test_views import DATA, DESIGN, options

    client = Client(server_url, verbose=False)
    client.predict(TINY, "cpu", False, api_name="/load_model")
    summary, log, _, download, _ = client.predict(*DATA, *DESIGN, "cmoe", *options(), api_name="/convert")
    assert "CMoE conversion" in summary and "layer 2/2" in log and download
    _, card, zip_file = client.predict("exact", True, api_name="/export")
    assert "trust_remote_code" in card and zip_file["value"].endswith("export-exact.zip")
    other = Client(server_url, verbose=False)  # a second browser session: no model, no conversion
    with pytest.raises(Exception, match="Convert a model"):
        other.predict("exact", True, api_name="/export")
    assert "cannot be converted" in client.predict(
        8, 0.25, "uniform", 7, "", 0.5, "", False, api_name="/design_estimate"
    )
