"""Run a decoder one layer at a time on captured inputs (the wanda / sparsegpt / CMoE mechanism).

Only one layer's activations are alive at once, so profiling and layer-by-layer conversion need memory
for the calibration hidden states, not for the whole forward graph.

Every family calls its layers its own way (a mask per attention type, rotary tables per layer type, Gemma-4's
per-layer input, a recurrent state), so nothing here builds those arguments: the model's own forward runs
once per micro-batch with each decoder layer stood in for by a recorder that keeps what the layer was given
and hands its hidden-state input on unchanged. The embeddings run, no layer does; the arguments shared by
several layers are kept once (each layer's dict refers to the same tensors). The final norm and head run the
same way (:func:`head_logits`): the model's own forward, with its layers standing in for the hidden states.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .plumbing import Cancel, Progress, check_cancel, report


class _StopForward(Exception):
    pass


class _WrongForm(Exception):
    """A stand-in got back something other than the hidden state it handed on."""


class SpilledStates:
    """Hidden states of the calibration micro-batches kept on disk, one file per micro-batch, each read back when
    its turn comes and freed after: what :class:`LayerInputs` holds in place of a list when a streamed model's
    activations are too large for its memory budget (:meth:`moe_core.streaming.LayerStream.spills`). A list as
    far as the driver is concerned (append, len, iteration, indexing); the folder goes when the object does."""

    def __init__(self, folder: str | Path | None = None):
        self._folder = folder
        self._tmp = tempfile.TemporaryDirectory(prefix="moe-studio-states-", dir=folder)
        self.shapes: list[torch.Size] = []

    def _path(self, i: int) -> Path:
        return Path(self._tmp.name) / f"{i}.safetensors"

    def append(self, h: torch.Tensor) -> None:
        from safetensors.torch import save_file

        save_file({"h": h.detach().contiguous()}, self._path(len(self.shapes)))
        self.shapes.append(h.shape)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(self._path(range(len(self))[i]))["h"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def empty(self) -> SpilledStates:
        """A new, empty store beside this one (where a layer's outputs go)."""
        return SpilledStates(self._folder)


def _empty_like(hidden) -> list | SpilledStates:
    return hidden.empty() if isinstance(hidden, SpilledStates) else []


@dataclass
class LayerInputs:
    """Hidden states entering decoder layer ``layer``, one entry per micro-batch, and every layer's call arguments."""

    hidden: list[torch.Tensor] | SpilledStates  # each (B, T, H); on disk when too large (SpilledStates)
    calls: list[list[tuple[tuple, dict]]]  # [layer][micro-batch]: (positional args after hidden, kwargs)
    ids: list[torch.Tensor]  # each (B, T): the tokens, for the head pass
    form: int | None = None  # a decoder layer returns: None a tensor, n a tuple of n (the hidden state first)
    layer: int = 0

    @property
    def kwargs(self) -> list[dict]:
        """Layer ``layer``'s keyword arguments, per micro-batch."""
        return [kw for _, kw in self.calls[self.layer]]

    @property
    def n_tokens(self) -> int:
        shapes = (
            self.hidden.shapes if isinstance(self.hidden, SpilledStates) else [h.shape for h in self.hidden]
        )
        return sum(s[0] * s[1] for s in shapes)

    def each(self) -> Iterator[tuple[torch.Tensor, tuple, dict]]:
        """(hidden (B, T, H), extra positional args, kwargs) of layer ``layer``, per micro-batch."""
        for h, (args, kw) in zip(self.hidden, self.calls[self.layer], strict=True):
            yield h, args, kw


class _StandIn(nn.Module):
    """Takes decoder layer i's place in the model's own forward: ``act(i, args, kwargs)`` is what it returns.

    What the forward reads from a layer (attention_type, is_sliding, ...) comes from the real one, which is not
    a child module (its weights are not reached through the stand-in)."""

    def __init__(self, real: nn.Module, i: int, act: Callable):
        super().__init__()
        self.__dict__.update(_real=real, _i=i, _act=act)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)

    def forward(self, *args, **kwargs):
        return self._act(self._i, args, kwargs)


@contextlib.contextmanager
def _stand_ins(layers: nn.ModuleList, act: Callable):
    real = list(layers)
    for i, layer in enumerate(real):
        layers[i] = _StandIn(layer, i, act)
    try:
        yield
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden state, the other positional args, kwargs) of a decoder layer call."""
    if args:
        return args[0], args[1:], kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def _as_output(h: torch.Tensor, form: int | None):
    return h if form is None else (h,) + (None,) * (form - 1)


def _same(a, b: torch.Tensor) -> bool:
    """The tensor handed on (or a full view of it: Gemma-4 slices to logits_to_keep=0 before KV-shared layers)."""
    return a is b or (
        isinstance(a, torch.Tensor)
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


class _Recorder:
    """Stand-in i keeps layer i's call arguments and returns the hidden state it was given, in ``form``."""

    def __init__(self, n_layers: int):
        self.n_layers, self.form, self.hidden, self.calls = n_layers, None, None, {}

    def __call__(self, i: int, args: tuple, kwargs: dict):
        h, rest, kw = _split(args, kwargs)
        if i == 0:
            self.hidden = h.detach()
        elif not _same(h, self.hidden):
            raise _WrongForm(i)
        self.calls[i] = (rest, kw)
        if i == self.n_layers - 1:
            raise _StopForward
        return _as_output(self.hidden, self.form)

    def record(self, dense, ids: torch.Tensor, form: int | None) -> None:
        """One micro-batch (B, T) through the model's own forward, its layers stood in for."""
        self.form, self.hidden, self.calls = form, None, {}
        with contextlib.suppress(_StopForward):
            dense.model(input_ids=ids, use_cache=False)
        if sorted(self.calls) != list(range(self.n_layers)):
            called = sorted(self.calls)
            raise ValueError(
                f"{dense.spec}'s forward called decoder layers {called}, not 0-{self.n_layers - 1}."
            )

    def record_first(self, dense, ids: torch.Tensor) -> None:
        """The first micro-batch: stand-ins return a tensor, else (not handed it back) a (hidden, None) tuple."""
        errors = []
        for form in (None, 2):  # a loop that indexes or unpacks the tensor (Falcon-H1, xLSTM) fails the first
            try:
                return self.record(dense, ids, form)
            except Exception as exc:
                errors.append(exc)
        real = [e for e in errors if not isinstance(e, _WrongForm)]
        raise real[0] if real else _changed(dense, errors[0])


def _changed(dense, exc: _WrongForm) -> ValueError:
    i = exc.args[0]
    return ValueError(
        f"{dense.spec}'s forward changes the hidden state between its decoder layers (before layer {i}), so it "
        "cannot be run one layer at a time."
    )


@torch.no_grad()
def capture_layer_inputs(
    dense, input_ids: torch.Tensor, batch_size: int = 1, store: SpilledStates | None = None
) -> LayerInputs:
    """Layer 0's hidden states and every layer's call arguments. input_ids (N, T) -> LayerInputs at layer 0.
    store: where the hidden states go (an empty :class:`SpilledStates`: to disk, one micro-batch at a time).

    The model's own forward runs once per micro-batch with its layers stood in for (the embeddings run, no
    layer does) and stops at the last layer. Whether a layer returns a tensor or a tuple is found on the
    first micro-batch: a stand-in that is not handed back the tensor it returned says it must be a tuple.
    """
    layers = dense.adapter.layers(dense.model)
    hidden = [] if store is None else store
    inputs, recorder = LayerInputs(hidden, [[] for _ in layers], [], None), _Recorder(len(layers))
    with _stand_ins(layers, recorder):
        for chunk in input_ids.to(dense.device).split(batch_size):
            try:
                if inputs.hidden:
                    recorder.record(dense, chunk, inputs.form)
                else:
                    recorder.record_first(dense, chunk)
            except _WrongForm as exc:
                raise _changed(dense, exc) from None
            inputs.form = recorder.form
            inputs.hidden.append(recorder.hidden)
            inputs.ids.append(chunk)
            for i, calls in enumerate(inputs.calls):
                calls.append(recorder.calls[i])
    return inputs


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """Apply one decoder layer (the one ``inputs`` enter, or a stand-in for it) to every micro-batch; returns
    the next layer's inputs."""
    outs, form = _empty_like(inputs.hidden), inputs.form
    for h, args, kw in inputs.each():
        out = layer(h, *args, **kw)
        form = len(out) if isinstance(out, tuple) else None
        outs.append(out[0] if isinstance(out, tuple) else out)
    return replace(inputs, hidden=outs, form=form, layer=inputs.layer + 1)


@torch.no_grad()
def head_logits(
    model: nn.Module, adapter, inputs: LayerInputs, keep: slice = slice(None)
) -> list[torch.Tensor]:
    """The model's own final norm and head (logit scaling, soft-capping) on the hidden states leaving its last
    layer: per micro-batch (B, T', V), the positions ``keep``. model: the transformers model (its layers stand in
    for the given hidden states during the pass; the embeddings run again, no layer does)."""
    layers = adapter.layers(model)
    if inputs.layer != len(layers):
        raise ValueError(
            f"head_logits needs the last layer's outputs, got the inputs of layer {inputs.layer}."
        )
    out = []
    for h, ids in zip(inputs.hidden, inputs.ids, strict=True):
        with _stand_ins(layers, lambda i, args, kwargs, h=h: _as_output(h, inputs.form)):
            logits = model(input_ids=ids, use_cache=False).logits
        out.append(logits[:, keep].contiguous())  # a copy only when keep drops positions of several rows
    return out


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
        for h, args, kw in inputs.each():
            with contextlib.suppress(_StopAtMLP):
                layer(h, *args, **kw)
    finally:
        handle.remove()
    return torch.cat(seen)


@torch.no_grad()
def apply_chunked(module: nn.Module, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """module(x) over rows of x (T, H) in chunks (bounded activation memory), each fed as one sequence (1, t, H):
    some MLPs read a batch and a time axis (Moshi's)."""
    return torch.cat([module(part[None])[0] for part in x.split(chunk)])


@dataclass
class LayerStep:
    """One decoder layer's turn in :func:`walk_layers`: its index, the layer, and the inputs entering it. A visitor
    that sets ``outputs`` hands those to the next layer in place of the layer's own outputs on ``inputs``."""

    index: int
    layer: nn.Module
    inputs: LayerInputs
    outputs: LayerInputs | None = None

    def run(self, *hooks: tuple[nn.Module, Callable]) -> LayerInputs:
        """Run the layer now with forward pre-hooks (module, hook(module, args)) in place (removed after), and
        hand its outputs to the next layer."""
        handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
        try:
            self.outputs = run_layer(self.layer, self.inputs)
        finally:
            for handle in handles:
                handle.remove()
        return self.outputs

    def run_seeing(self, module: nn.Module) -> torch.Tensor:
        """Run the layer now (as :meth:`run`) and return what ``module`` (its MLP, say) received: (N*T, H)."""
        seen = []
        self.run((module, lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))))
        return torch.cat(seen)


def walk_layers(
    model,
    input_ids: torch.Tensor | None = None,
    *,
    start: LayerInputs | None = None,
    batch_size: int = 4,
    last: int | None = None,
    progress: Progress = None,
    cancel: Cancel = None,
    label: str = "Layer",
) -> Iterator[LayerStep]:
    """The layer-by-layer driver every one-layer-at-a-time stage runs on (conversion, profiling, sensitivity,
    the sweep, evaluation): yields layer 0 .. ``last`` (default: the last layer) of ``model`` (a DenseModel) in
    order, each with what enters it on input_ids (N, T); after the visitor's turn the layer runs on those inputs
    (it may have replaced the layer's MLP, or hooked it) to give the next layer's, unless the visitor set
    ``step.outputs``. Once a layer has run, ``step.outputs`` holds what leaves it (the last step's: the model's
    final hidden states). ``start``: resume from inputs captured earlier (at layer ``start.layer``) instead.

    Only one layer's calibration activations are alive at a time. Inside :func:`moe_core.streaming.streaming`
    only one layer's weights are too: each is read from the shards before its turn and written and freed after.
    Cancel is checked before every layer; progress is reported after each."""
    from .streaming import active

    if (input_ids is None) == (start is None):
        raise ValueError("walk_layers takes either input_ids or start (inputs captured earlier), not both.")
    stream = active()
    layers = model.adapter.layers(model.model)
    last = len(layers) - 1 if last is None else last
    inputs = start
    if inputs is None:
        store = SpilledStates() if stream is not None and stream.spills(model, input_ids) else None
        inputs = capture_layer_inputs(model, input_ids, batch_size, store)
        if stream is not None:
            stream.captured(model)
    first = inputs.layer
    for i in range(first, last + 1):
        check_cancel(cancel)
        if stream is not None:
            stream.load(model, i)
        step = LayerStep(i, layers[i], inputs)
        yield step
        inputs = step.outputs if step.outputs is not None else run_layer(layers[i], inputs)
        step.outputs = inputs
        if stream is not None:
            stream.done(model, i)
        report(progress, (i + 1 - first) / (last + 1 - first), f"{label}: layer {i + 1}/{last + 1}")


def with_mlp(layer: nn.Module, mlp: nn.Module, block: nn.Module) -> nn.Module:
    """A shallow copy of a decoder layer whose MLP ``mlp`` is ``block`` (parameters shared, the layer untouched):
    what a stage runs to see the layer with a candidate block in place."""
    import copy

    clone = copy.copy(layer)
    clone._modules = dict(layer._modules)
    name = next(n for n, m in layer.named_children() if m is mlp)
    clone._modules[name] = block
    return clone


def run_rest(model, start: LayerInputs, swap: dict[int, nn.Module] | None = None) -> LayerInputs:
    """Run ``model`` (a DenseModel) from inputs captured at layer ``start.layer`` to its last layer on the
    driver, decoder layer i stood in for by ``swap[i]`` where given: the final hidden states."""
    swap = swap or {}
    step = None
    for step in walk_layers(model, start=start):
        if step.index in swap:
            step.outputs = run_layer(swap[step.index], step.inputs)
    return start if step is None else step.outputs


def window_logits(
    model,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: Progress = None,
    cancel: Cancel = None,
    visit: Callable[[LayerStep], None] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids (B, T), logits (B, T - 1, V) at its predicting positions) of windows (W, T), one micro-batch of ``batch_size``
    windows at a time, on the driver: every window goes through layer i, then layer i + 1 (so a streamed model
    is read once), then the model's own head runs one micro-batch at a time (one batch's logits alive).
    visit(step): called at each layer's turn; it may set ``step.outputs`` (the layer run with another MLP, say)."""
    from .streaming import active

    steps = walk_layers(
        model, windows, batch_size=batch_size, progress=progress, cancel=cancel, label="Scoring"
    )
    for step in steps:
        if visit is not None:
            visit(step)
    final = step.outputs  # every layer walked; the last one's outputs
    if active() is not None:
        active().head(model)  # the embeddings and head a streamed model freed
    for h, ids in zip(final.hidden, final.ids, strict=True):
        check_cancel(cancel)
        one = replace(final, hidden=[h], ids=[ids])
        yield ids, head_logits(model.model, model.adapter, one, keep=slice(None, -1))[0]


def target_layers(layers: tuple[int, ...] | None, n_layers: int, section: str) -> list[int]:
    """The layers a method's ``{section}.layers`` names (None: every layer), or ValueError for one that does
    not exist."""
    if layers is None:
        return list(range(n_layers))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"{section}.layers {bad} do not exist: the model has layers 0..{n_layers - 1}.")
    return list(layers)


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
    forcing: layers are independent). Only one layer's calibration activations are alive at a time. Inside
    :func:`moe_core.streaming.streaming`, only one layer's weights are too: each is read from the shards before
    its turn and written out and freed after it.
    reference(i): the module whose output on x is y (default: the layer's MLP as it is when its turn comes).
    Runs on :func:`walk_layers` (streaming included).
    """
    infos, last = [], max(targets)
    steps = walk_layers(
        model, input_ids, batch_size=batch_size, last=last, progress=progress, cancel=cancel, label=label
    )
    for step in steps:
        i, layer = step.index, step.layer
        if i not in targets:
            continue
        mlp = model.adapter.mlp(model.model, i)
        x = ffn_inputs(layer, mlp, step.inputs)
        y = apply_chunked(mlp if reference is None else reference(i), x)
        del mlp  # a build that puts its block in place early (CMoE's) frees a streamed layer's dense MLP then
        if i == last:  # nothing runs after the last target
            step.outputs = step.inputs
        elif not sequential:  # teacher forcing: the next layer gets the original layer's outputs
            step.outputs = run_layer(layer, step.inputs)
        block, info = build(i, x, y)
        model.adapter.set_mlp(model.model, i, block)
        infos.append(info)
    return infos
