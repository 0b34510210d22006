"""benchmarks/speed.py's measuring parts on a tiny model: the paired speed-ups and the decode-step breakdown."""

import importlib.util
from pathlib import Path

import pytest
import torch

from moe_core.model_io import tiny_model


@pytest.fixture(scope="module")
def speed():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
