"""Run a decoder one layer at a time on captured inputs (the wanda / sparsegpt / CMoE mechanism).

Only one layer's activations are alive at once, so profiling and layer-by-layer conversion need memory
for the calibration hidden states, not for the whole forward graph.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


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
