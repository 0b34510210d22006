"""The whole flow in a real browser: Debian's headless Chromium driven by Playwright walks model -> data ->
profile -> design (and its budget mode: measure, allocation) -> convert (CMoE on tiny-llama, with a trained
router and a two-step distillation: its loss curve) -> evaluate -> export -> download, checks the downloaded zip
loads with transformers, and saves a screenshot of every tab (MOE_STUDIO_SCREENSHOTS, else a tmp folder)."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest

from moe_core.config import CMoEConfig
from tests.conftest import browser_model

pytestmark = pytest.mark.browser
TINY = "builtin:tiny-llama"
TIMEOUT_MS = 60_000 if browser_model() == TINY else 1_200_000  # a real model: minutes a step on a CPU
# As root in a container Chromium needs --no-sandbox; the rest keep it off this machine's closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.skip(
            "No Chromium: install Debian's chromium package (make test does: apt-get install chromium)."
        )
    return path


@pytest.fixture(scope="module")
def page(server_url):
    playwright_api = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server_url)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MOE_STUDIO_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def _shot(page, shots: Path, name: str) -> None:
    page.wait_for_timeout(400)  # let plots finish their transition
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def _radio(page, name: str):
    return page.get_by_label(name, exact=True).locator("visible=true")


def _button(page, name: str):
    return page.get_by_role("button", name=name, exact=True).locator("visible=true")


def test_model_to_download_in_a_browser(page, shots, tmp_path):
    page.get_by_text("FFN share of the parameters").wait_for()  # the page loads the model on open
    _shot(page, shots, "model_tab")

    tiny = (
        browser_model() == TINY
    )  # a real model walks the default flow: 75% budget, routing step, distillation
    _tab(page, "Data")
    if tiny:
        sequences = page.get_by_label(
            "number input for Sequences"
        )  # 8 x 512 keeps the walk to seconds a step
        sequences.fill("8")
        sequences.press("Enter")
    _button(page, "Preview").click()
    page.get_by_text("calibration tokens").wait_for()
    _shot(page, shots, "data_tab")

    _tab(page, "Profile")
    _button(page, "Profile").click()
    page.get_by_text("tokens profiled").wait_for()
    _shot(page, shots, "profile_tab")

    _tab(page, "Design")
    page.get_by_text("active FFN budget (mean over layers)").wait_for()  # the default layout: a 75% budget
    _shot(page, shots, "design_tab")
    if tiny:  # a real model walks the default: Convert measures the sensitivity itself (minutes on a CPU)
        _radio(page, "budget").check()  # one active budget, a shape per layer from measured sensitivity
        _button(page, "Measure sensitivity").click()
        page.get_by_text("of the FFN runs per token (the allocation)").wait_for()
        page.get_by_text("Allocation: active share per layer").wait_for()
        _shot(page, shots, "design_budget")
        _radio(page, "uniform").check()

    _tab(page, "Convert")
    page.get_by_text("Routing (any method)").click()
    _radio(page, "trained").check()
    page.get_by_label("Refit the down projections").check()
    if tiny:
        page.get_by_text("Distillation (any method, on by default)").click()
        page.get_by_label("Distil after converting").check()
        page.get_by_label("Token budget").fill("2048")  # 8 windows of 256 tokens: two steps on the tiny model
        page.get_by_label("Token budget").press("Enter")
        page.wait_for_function(
            "() => document.body.innerText.includes('--distill-tokens 2048')"
        )  # the preview
    _button(page, "Convert").click()
    page.get_by_text("CMoE conversion of").wait_for()
    if tiny:
        page.get_by_text("Distillation: KL(dense || MoE)").wait_for()
    page.get_by_text("before → after the routing step").wait_for()
    assert "python -m moe_core convert" in page.locator("body").inner_text()
    _shot(page, shots, "convert_tab")

    _tab(page, "Evaluate")
    _button(page, "Evaluate").click()
    layout = (
        CMoEConfig().experts if tiny else f"budget {CMoEConfig().budget:.0%}"
    )  # tiny: set to uniform above
    page.get_by_text(f"Run #1 cmoe {layout}").wait_for()
    _shot(page, shots, "evaluate_tab")

    _tab(page, "Compare")
    _button(page, "Generate with both").click()
    page.get_by_text("Converted (MoE)").wait_for()
    _shot(page, shots, "compare_tab")

    _tab(page, "Routing policy")
    _shot(page, shots, "routing_tab")

    _tab(page, "Export")
    page.get_by_label("exact: identical logits, needs trust_remote_code").check()
    _button(page, "Build export").click()
    download_button = _button(page, "Download zip")
    download_button.wait_for()
    page.get_by_text("Fidelity (measured)").wait_for()
    _shot(page, shots, "export_tab")
    with page.expect_download() as info:
        download_button.click()
    archive = tmp_path / "export.zip"
    info.value.save_as(archive)
    _check_loads(archive, tmp_path / "unzipped")


def _check_loads(archive: Path, target: Path) -> None:
    """The downloaded export reloads with stock transformers (exact: its own modeling file, remote code)."""
    import torch
    from transformers import AutoModelForCausalLM

    with zipfile.ZipFile(archive) as z:
        z.extractall(target)
    (folder,) = [p for p in target.iterdir() if p.is_dir()]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape[:2] == (1, 4) and torch.isfinite(logits).all()
    assert type(model).__name__ == "MoEStudioForCausalLM"
