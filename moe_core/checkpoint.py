"""Save and reload a converted model exactly (this project's own format; moe_core.export adds portable ones).

A checkpoint folder holds:

- ``config.json``: the dense model's transformers config (the skeleton to rebuild);
- ``model.safetensors``: the full state dict, MoE layers included; a tied LM head is stored once (a streamed
  conversion, moe_core.streaming, writes it as numbered shards with ``model.safetensors.index.json``);
- ``moe_layers.json``: ``{"format", "version", "dtype", "tied", "layers": {index: MoEMLP.spec()}}``;
- the tokenizer files, ``run_config.json`` (the config that made it) and ``metrics.json``.

It is written to a temporary sibling folder and renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch

FORMAT = "moe-studio-converted"
VERSION = 1
MOE_LAYERS = "moe_layers.json"


class NotAConvertedCheckpoint(ValueError):
    """The folder is not a checkpoint written by save_converted."""


def is_converted(folder: str | Path) -> bool:
    path = Path(folder) / MOE_LAYERS
    try:
        return path.is_file() and json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _tied_aliases(model) -> dict[str, str]:
    """{dropped name: kept name} for state-dict entries sharing storage (a tied LM head)."""
    seen, aliases = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() == 0:
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def _moe_specs(dense) -> dict[str, dict]:
    from .evaluate import moe_blocks

    return {str(i): block.spec() for i, block in moe_blocks(dense).items()}


def temp_folder(folder: Path) -> Path:
    """A fresh temporary sibling of ``folder`` to write a checkpoint into (renamed into place once whole);
    refuses a non-empty ``folder`` that is not a converted checkpoint."""
    if folder.exists() and any(folder.iterdir()) and not is_converted(folder):
        raise ValueError(
            f"'{folder}' exists and is not a converted checkpoint; choose an empty or new output folder."
        )
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_converted(dense_moe, folder: str | Path, run_config: dict, metrics: dict | None = None) -> Path:
    """Write a converted DenseModel to ``folder`` (replacing an earlier checkpoint there); returns the folder.

    Refuses to overwrite a non-empty folder that is not a converted checkpoint.
    """
    folder = Path(folder).expanduser()
    tmp = temp_folder(folder)
    try:
        _write_folder(dense_moe, tmp, run_config, metrics)
        _swap_into_place(tmp, folder)
    except BaseException as exc:  # a full disk, an interrupt: no half-written checkpoint stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(
                exc.errno,
                f"The disk is full: saving the converted model to '{folder}' failed and the partial files "
                "were removed. Free some space or choose an output folder on another disk",
            ) from exc
        raise
    return folder


def _write_folder(dense_moe, tmp: Path, run_config: dict, metrics: dict | None) -> None:
    from safetensors.torch import save_file

    aliases = _tied_aliases(dense_moe.model)
    state = {k: v.detach().contiguous() for k, v in dense_moe.model.state_dict().items() if k not in aliases}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    dense_moe.model.config.save_pretrained(tmp)
    dense_moe.tokenizer.save_pretrained(tmp)
    dtype = str(next(dense_moe.model.parameters()).dtype).removeprefix("torch.")
    layers = {"format": FORMAT, "version": VERSION, "dtype": dtype, "tied": aliases}
    layers |= {"source": dense_moe.spec, "layers": _moe_specs(dense_moe)}
    _write_json(tmp / MOE_LAYERS, layers)
    _write_json(tmp / "run_config.json", run_config)
    _write_json(tmp / "metrics.json", metrics or {})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def _swap_into_place(tmp: Path, folder: Path) -> None:
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def read_json(folder: str | Path, name: str) -> dict:
    """One of a checkpoint's JSON files (run_config.json, metrics.json, moe_layers.json); {} if absent."""
    path = Path(folder) / name
    return json.loads(path.read_text()) if path.is_file() else {}


@torch.no_grad()
def load_converted(folder: str | Path, device: str = "cpu", trust_remote_code: bool = False):
    """Rebuild a converted DenseModel saved by save_converted: same modules, same weights, same logits.
    trust_remote_code: a source family that only its repository's code defines (its config, model, tokenizer).

    Returns a ConvertedModel: with the folder's run config and metrics, the method's report (metrics'
    "conversion") and the routing plan the run config applied, if any.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .methods import report_from_dict
    from .model_io import ConvertedModel, adapter_for_config
    from .moe import MoEMLP

    folder = Path(folder).expanduser()
    if not is_converted(folder):
        raise NotAConvertedCheckpoint(
            f"'{folder}' is not a converted MoE Studio checkpoint (no valid {MOE_LAYERS}). Give a folder "
            "written by `python -m moe_core convert`; load dense model folders with load_model."
        )
    meta = read_json(folder, MOE_LAYERS)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    adapter = adapter_for_config(config, trust_remote_code)
    dtype = getattr(torch, meta["dtype"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for i, spec in meta["layers"].items():
        adapter.set_mlp(model, int(i), MoEMLP.from_spec(spec).to(dtype))
    _load_state(model, _read_weights(folder, load_file), meta["tied"])
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    run_config, metrics = read_json(folder, "run_config.json"), read_json(folder, "metrics.json")
    plan = None
    if isinstance(run_config.get("plan"), dict):
        from .sweep import Plan

        plan = Plan.from_dict(run_config["plan"])
    report = report_from_dict(metrics.get("conversion"))
    return ConvertedModel(
        model.to(device).eval(), tokenizer, adapter, str(folder), conversion=report, run_config=run_config,
        metrics=metrics, plan=plan,
    )  # fmt: skip


def _read_weights(folder: Path, load_file) -> dict:
    """The state dict of a checkpoint: one model.safetensors, or the shards a streamed conversion writes."""
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state |= load_file(str(folder / shard))
    return state


def _load_state(model, state: dict, tied: dict[str, str]) -> None:
    """load_state_dict that accepts exactly the tied names as missing, and re-ties them if needed."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != set(tied) or unexpected:
        raise ValueError(
            f"Checkpoint weights do not match the model: missing {sorted(set(missing) - set(tied))}, "
            f"unexpected {sorted(unexpected)}. The folder may be from another version; convert again."
        )
    params = model.state_dict(keep_vars=True)
    for name, source in tied.items():
        if params[name].data_ptr() != params[source].data_ptr():
            params[name].data.copy_(params[source].data)
