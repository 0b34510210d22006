"""benchmarks/speed.py's measuring parts on a tiny model: the paired speed-ups and the decode-step breakdown."""

import importlib.util
from pathlib import Path

import pytest
import torch

from moe_core.checkpoint import save_converted
from moe_core.evaluate import param_report
from moe_core.model_io import tiny_model


def _benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed():
    return _benchmark("speed")


@pytest.fixture(scope="module")
def models(speed):
    dense = tiny_model("llama")
    calib = torch.randint(0, 250, (2, 64), generator=torch.Generator().manual_seed(0))
    return speed.build_models(dense, ["S1A1E4"], calib)


def test_speed_summary_has_the_issue_keys(speed, models):
    prefill, prompt = torch.randint(0, 250, (2, 32)), torch.randint(0, 250, (1, 8))
    ideals = speed.ideal_speedups(models, 32, 8 + 3 / 2)
    assert ideals["dense"]["ideal_speedup"] == 1.0 and ideals["S1A1E4"]["ideal_speedup"] > 1.2
    speeds = speed.measure(models, prefill, prompt, n_new=3, repeats=2)
    summary = speed.summarise(speeds, ideals)["S1A1E4"]
    assert {"ideal_speedup", "prefill_speedup", "decode_speedup"} <= summary.keys()
    assert all(v > 0 for v in summary.values())
    assert summary["decode_achieved"] == pytest.approx(
        summary["decode_speedup"] / summary["ideal_decode_speedup"], rel=1e-2
    )
    assert "| S1A1E4 |" in speed.speed_table(speeds, ideals, speed.summarise(speeds, ideals))
    setup = speed.setup_line(models)
    assert "threads" in setup and "MoE decode fused" in setup and "prefill grouped_mm" in setup


def test_breakdown_times_the_fused_decode_parts_and_restores_the_methods(speed, models):
    moe, prompt = models["S1A1E4"], torch.randint(0, 250, (1, 8))
    parts = speed.breakdown(moe, prompt, 4)
    assert all(
        parts[key] > 0 for key in ["attention", "ffn", *speed.DECODE_PARTS.values(), "lm_head", "step"]
    )
    inside = sum(parts[key] for key in speed.DECODE_PARTS.values())
    assert inside <= parts["ffn"] * 1.05  # medians over steps: sums need not match exactly
    dense_parts = speed.breakdown(models["dense"], prompt, 4)
    assert dense_parts["ffn"] > 0 and all(dense_parts[key] == 0 for key in speed.DECODE_PARTS.values())
    block = moe.mlp(0)
    assert all(name not in vars(block) for name in speed.DECODE_PARTS)  # the timers are gone


def test_distill_settings_ranks_settings_from_one_saved_start_by_held_out_kl(tmp_path, capsys):
    """benchmarks/distill_settings.py: every setting starts from the same saved conversion (same held-out KL
    before), trains, and is reported in the table, the JSON last line and the JSON-lines file."""
    import json

    from moe_core.config import ConvertRun, from_dict
    from moe_core.model_io import load_model
    from moe_core.pipeline import convert_run

    bench = _benchmark("distill_settings")
    data = {"text": "builtin:pydoc", "n_sequences": 4, "seq_len": 32}
    # the partition: token-cut experts start this tiny model so close to dense (held-out KL 6e-5) that 4 steps
    # do not lower it
    cmoe = {"experts": "S1A1E4", "cluster_on": "magnitude"}
    tree = {"model": {"spec": "builtin:tiny-llama"}, "data": data, "cmoe": cmoe}
    convert_run(load_model("builtin:tiny-llama"), from_dict(ConvertRun, tree | {"distill": {"enabled": False}}),
                folder=tmp_path / "c")  # fmt: skip
    base = {"text": "builtin:pydoc", "seq_len": 32, "batch_size": 2, "train": ["experts", "routers", "norms"]}
    jsonl = tmp_path / "rows.jsonl"
    # 3e-4, not 3e-3: at a held-out KL of 7e-5 a 3e-3 Adam step overshoots (6.8982e-5 -> 6.8988e-5 after 4 steps
    # with the fused KL's gradient; 3e-4 lowers it to 6.815e-5)
    settings = ['{"lr": 3e-4}', '{"lr": 1e-6}', '{"lr": 3e-4, "hidden_weight": 1.0}']
    args = ["--model", str(tmp_path / "c"), "--steps", "4", "--eval-windows", "2", "--base", json.dumps(base)]
    summary = bench.main([*args, "--settings", *settings, "--jsonl", str(jsonl)])
    rows = summary["rows"]
    assert summary["reference"] == "builtin:tiny-llama" and [r["settings"] for r in rows] == [
        json.loads(s) for s in settings
    ]
    assert len({r["held_out_kl_start"] for r in rows}) == 1  # one start for every setting
    assert all(r["steps"] == 4 and r["tokens"] == 4 * 2 * 32 for r in rows)
    fast, slow = rows[0]["held_out_kl"], rows[1]["held_out_kl"]
    assert fast < rows[0]["held_out_kl_start"] and fast != slow
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == summary and '| {"lr": 1e-06} |' in "\n".join(out)
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == rows


def test_saved_conversions_are_timed_beside_new_ones_with_their_ffn_bound(speed, models, tmp_path):
    save_converted(models["S1A1E4"], tmp_path / "c25", {"method": "cmoe"})
    both = speed.build_models(models["dense"], [], None, [str(tmp_path / "c25")])
    assert list(both) == ["dense", "c25"]
    ids = torch.randint(0, 250, (1, 8))
    with torch.no_grad():
        assert torch.equal(both["c25"].model(ids).logits, models["S1A1E4"].model(ids).logits)
    share = param_report(both["c25"])["active_ffn_share"]
    bound = speed.ffn_bounds(both, {"step": 10.0, "ffn": 4.0})["c25"]
    assert bound == pytest.approx(10.0 / (10.0 - 4.0 * (1 - share)))
    with pytest.raises(SystemExit, match="already taken"):
        speed.build_models(
            models["dense"], ["S1A1E4"], torch.randint(0, 250, (2, 16)), [str(tmp_path / "S1A1E4")]
        )
