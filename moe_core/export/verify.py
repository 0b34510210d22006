"""Reload an export in a clean Python process and measure how close it is to the internal model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import EVAL_TEXT, EXACT_TOL
from .native import ExportError

# ---------------------------------------------------------------------------------------------
# Verification in a clean process

_RELOAD_SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
jobs = json.load(open(sys.argv[1]))
data = torch.load(jobs["tokens"], weights_only=True)
results = []
for job in jobs["folders"]:
    folder = Path(job["folder"])
    ggufs = [] if any(folder.glob("*.safetensors")) else sorted(p.name for p in folder.glob("*.gguf"))
    # config.json gives the expert widths, which transformers' GGUF reader does not map for qwen2moe
    extra = {"gguf_file": ggufs[0], "config": AutoConfig.from_pretrained(folder)} if ggufs else {}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=job["remote"], dtype="auto", **extra)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data["ids"]).logits.float()
        gen = model.generate(data["prompt"], max_new_tokens=data["new_tokens"], do_sample=False)
    torch.save({"logits": logits, "generated": gen}, job["out"])
    results.append({"class": type(model).__name__, "moe_core_imported": "moe_core" in sys.modules,
                    "gguf_file": ggufs[0] if ggufs else None})
print(json.dumps(results))
"""


def eval_tokens(tokenizer, text: str = EVAL_TEXT, max_tokens: int = 96) -> torch.Tensor:
    """(1, T) fixed evaluation tokens of a short text."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
    if ids.shape[1] < 4:
        raise ExportError("The evaluation text is too short for this tokenizer.")
    return ids


def reload_logits(folders: list[tuple[Path, bool]], ids, prompt, new_tokens: int = 12) -> list[dict]:
    """Load each (folder, trust_remote_code) with AutoModelForCausalLM in one fresh Python process.

    Returns per folder: logits (1, T, V) on ids, greedy generation from prompt, and the loaded class.
    """
    with tempfile.TemporaryDirectory(prefix="moe-export-check-") as work:
        work = Path(work)
        torch.save({"ids": ids, "prompt": prompt, "new_tokens": new_tokens}, work / "tokens.pt")
        jobs = [
            {"folder": str(Path(f).resolve()), "remote": r, "out": str(work / f"{n}.pt")}
            for n, (f, r) in enumerate(folders)
        ]
        (work / "jobs.json").write_text(json.dumps({"tokens": str(work / "tokens.pt"), "folders": jobs}))
        env = {**_clean_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", _RELOAD_SCRIPT, str(work / "jobs.json")],
            cwd=work, env=env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ExportError(f"Reloading the export in a clean process failed:\n{proc.stderr[-3000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        return [
            {**torch.load(job["out"], weights_only=True), **meta}
            for job, meta in zip(jobs, info, strict=True)
        ]


def _clean_env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the child must not see moe_core


@torch.no_grad()
def verify(moe, folders: list[tuple[Path, bool]], text: str = EVAL_TEXT) -> list[dict]:
    """Fidelity of each reloaded folder against the internal model ``moe`` on the fixed text."""
    ids = eval_tokens(moe.tokenizer, text)
    prompt = ids[:, :8]
    device = moe.device
    ref = moe.model(input_ids=ids.to(device)).logits.float().cpu()
    ref_gen = moe.model.generate(prompt.to(device), max_new_tokens=12, do_sample=False).cpu()
    results = []
    for loaded in reload_logits(folders, ids, prompt):
        metrics = compare(ref, loaded["logits"], ids)
        metrics["generation_match"] = bool(torch.equal(ref_gen, loaded["generated"]))
        metrics["generated_text"] = moe.tokenizer.decode(loaded["generated"][0, prompt.shape[1] :])
        metrics["loaded_class"] = loaded["class"]
        metrics["clean_process"] = not loaded["moe_core_imported"]
        if loaded.get("gguf_file"):
            metrics["gguf_file"] = loaded["gguf_file"]
        results.append(metrics)
    return results


def compare(ref_logits, logits, ids) -> dict:
    """max |Δlogit|, KL(internal || export), top-1 agreement and both perplexities; logits (1, T, V)."""
    ref_logp = F.log_softmax(ref_logits[0].float(), -1)  # (T, V)
    logp = F.log_softmax(logits[0].float(), -1)
    targets = ids[0, 1:]
    nll = -logp[:-1].gather(1, targets[:, None]).mean()
    ref_nll = -ref_logp[:-1].gather(1, targets[:, None]).mean()
    max_diff = float((ref_logits - logits).abs().max())
    return {
        "max_abs_logit_diff": max_diff,
        "kl": float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()),
        "top1_agreement": float((ref_logp.argmax(-1) == logp.argmax(-1)).float().mean()),
        "ppl_internal": math.exp(float(ref_nll)),
        "ppl_export": math.exp(float(nll)),
        "tokens": int(ids.shape[1]),
        "identical": max_diff <= EXACT_TOL,
    }
