"""Run a decoder one layer at a time on captured inputs (the wanda / sparsegpt / CMoE mechanism).

Only one layer's activations are alive at once, so profiling and layer-by-layer conversion need memory
for the calibration hidden states, not for the whole forward graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .plumbing import Cancel, Progress, check_cancel, report


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Hidden states entering a decoder layer, one entry per micro-batch, plus the layer kwargs."""

    hidden: list[torch.Tensor]  # each (B, T, H)
    kwargs: list[dict]  # attention mask, position ids / embeddings: the same for every layer

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


@torch.no_grad()
def capture_layer_inputs(dense, input_ids: torch.Tensor, batch_size: int = 1) -> LayerInputs:
    """Run the embeddings (and rotary set-up) and stop at layer 0. input_ids (N, T) -> LayerInputs."""
    first = dense.adapter.layers(dense.model)[0]
    hidden, kwargs = [], []

    def catch(module, args, kw):
        hidden.append((args[0] if args else kw.pop("hidden_states")).detach())
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for chunk in input_ids.to(dense.device).split(batch_size):
            with contextlib.suppress(_StopForward):
                dense.model.model(input_ids=chunk, use_cache=False)
    finally:
        handle.remove()
    return LayerInputs(hidden, kwargs)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """Apply one decoder layer to every micro-batch; returns the next layer's inputs."""
    outs = []
    for h, kw in zip(inputs.hidden, inputs.kwargs, strict=True):
        out = layer(h, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return LayerInputs(outs, inputs.kwargs)


@torch.no_grad()
def mlp_inputs(
    layer: nn.Module, mlp: nn.Module, inputs: LayerInputs
) -> tuple[list[torch.Tensor], LayerInputs]:
    """Run a layer and also return what its MLP received: per micro-batch (B*T, H), and the outputs."""
    seen = []
    handle = mlp.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    try:
        outputs = run_layer(layer, inputs)
    finally:
        handle.remove()
    return seen, outputs


class _StopAtMLP(Exception):
    pass


@torch.no_grad()
def ffn_inputs(layer: nn.Module, mlp: nn.Module, inputs: LayerInputs) -> torch.Tensor:
    """What ``mlp`` receives on every micro-batch, (N*T, H); the MLP and the rest of the layer never run."""
    seen = []

    def catch(module, args):
        seen.append(args[0].reshape(-1, args[0].shape[-1]))
        raise _StopAtMLP

    handle = mlp.register_forward_pre_hook(catch)
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs, strict=True):
            with contextlib.suppress(_StopAtMLP):
                layer(h, **kw)
    finally:
        handle.remove()
    return torch.cat(seen)


@torch.no_grad()
def apply_chunked(module: nn.Module, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """module(x) over rows of x (T, H) in chunks (bounded activation memory)."""
    return torch.cat([module(part) for part in x.split(chunk)])


# build(layer index, x (T, H) what the MLP receives, y (T, H) what the dense MLP returns) -> (block, info)
LayerBuild = Callable[[int, torch.Tensor, torch.Tensor], tuple[nn.Module, dict]]


@torch.no_grad()
def convert_layers(
    model,
    input_ids: torch.Tensor,
    targets: list[int],
    build: LayerBuild,
    *,
    batch_size: int = 4,
    sequential: bool = True,
    progress: Progress = None,
    cancel: Cancel = None,
    label: str = "Converting",
    reference: Callable[[int], nn.Module] | None = None,
) -> list[dict]:
    """The layer-by-layer driver: replace the MLP of every target layer of ``model`` (a DenseModel, changed in
    place) by ``build(i, x, y)``'s block, where x (N*T, H) is what that MLP receives on input_ids (N, T) and
    y (N*T, H) what it returns. Returns the builds' infos, in layer order.

    sequential: the next layer's inputs come from the converted layer, so each layer is built on what the
    converted prefix really produces (the CMoE code's behaviour); else from the original layer (teacher
    forcing: layers are independent). Only one layer's calibration activations are alive at a time.
    reference(i): the module whose output on x is y (default: the layer's MLP as it is when its turn comes).
    """
    layers, infos = model.adapter.layers(model.model), []
    inputs, last = capture_layer_inputs(model, input_ids, batch_size), max(targets)
    for i in range(last + 1):
        check_cancel(cancel)
        layer = layers[i]
        if i in targets:
            x = ffn_inputs(layer, layer.mlp, inputs)
            y = apply_chunked(layer.mlp if reference is None else reference(i), x)
            original = None if sequential or i == last else run_layer(layer, inputs)
            block, info = build(i, x, y)
            model.adapter.set_mlp(model.model, i, block)
            infos.append(info)
            if i < last:
                inputs = run_layer(layer, inputs) if sequential else original
        else:
            inputs = run_layer(layer, inputs)
        report(progress, (i + 1) / (last + 1), f"{label}: layer {i + 1}/{last + 1}")
    return infos
