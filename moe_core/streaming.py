"""Convert a model that does not fit in memory: one decoder layer at a time, straight from its safetensors shards.

The model is a meta-device shell (accelerate's ``init_empty_weights``: modules, no weights). The embeddings and
the final norm are read once; the calibration tokens are embedded and every layer's call arguments recorded
(:func:`moe_core.layerwise.capture_layer_inputs`, which runs no layer). Then, for each decoder layer in turn,
its weights are read from the shards (``safe_open``, one tensor at a time, in the compute dtype), the method
converts it on what the converted layers before it produce, it runs once to produce the next layer's inputs,
its tensors go to the output shards at once, and it goes back to the meta device. At no time does more than one
layer's weights, plus the embeddings and the calibration activations, live in memory. The LM head is never read
into the model: it is copied from the input shards to the output ones.

The output is this project's converted checkpoint (``moe_core.checkpoint``), in numbered shards with an index,
so ``load_converted`` and every export read it as they read an in-memory conversion's; on the same folder the
two give identical weights. What streams: every method with its routing step (CMoE, LaDiMo, DIVE without its
retraining and FLAP: each layer routed and refitted as soon as it is built), the per-layer budget's sensitivity
measurement, DIVE's statistics and domain mining and FLAP's statistics (each a walk of its own over the layers,
the source read once more), profiling (:func:`reading`: each layer read, profiled and freed, nothing written),
evaluation, and the exports (``moe_core.export.streamed``). What cannot, refused before anything is read, with
what would run it: DIVE's retraining, distillation and fine-tuning (they train through the whole model), and a
routing plan.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30}  # fmt: skip
SHARD_BYTES = 0  # output shard size: 0 writes each layer to its own shard at once (nothing waits in memory)
INDEX = "model.safetensors.index.json"


def parse_bytes(text: str | int | None) -> int | None:
    """'2GB', '1.5 GiB', '800MB' or a number of bytes -> bytes; None stays None."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in UNITS:
        raise ValueError(f"'{text}' is not a memory size: write it like 2GB, 1.5GiB or 800MB.")
    return int(float(match.group(1)) * UNITS[unit])


# ---------------------------------------------------------------------------------------------
# Shards in, shards out


class ShardReader:
    """The tensors of a model folder's safetensors files (one, or shards with an index), read one at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    self.files |= dict.fromkeys(f.keys(), path)
        if not self.files:
            raise ValueError(
                f"'{folder}' holds no safetensors weights: streaming reads model folders of shards."
            )

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, copied out of its shard (the file's mapping is closed again at once, so the pages read
        do not stay counted in this process's memory)."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as f:
            tensor = f.get_tensor(name)
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))


def folder_bytes(folder: str | Path) -> int:
    """Bytes of a folder's safetensors files (0 when it has none)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


class ShardWriter:
    """Writes tensors to numbered safetensors shards as they come (a shard closes once it passes ``shard_bytes``),
    then the index."""

    def __init__(self, folder: Path, metadata: dict[str, str], shard_bytes: int = SHARD_BYTES):
        self.folder, self.metadata, self.shard_bytes = folder, metadata, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.shards, self.weight_map = 0, [], {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.pending[name] = tensor.detach().contiguous().cpu()
            self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata=self.metadata)
        self.shards.append(name)
        self.weight_map |= dict.fromkeys(self.pending, name)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Flush the last shard, name the shards -of-N, write the index."""
        self._flush()
        n, renamed = len(self.shards), {}
        for k, name in enumerate(self.shards, 1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            (self.folder / name).rename(self.folder / final)
            renamed[name] = final
        weight_map = {t: renamed[f] for t, f in sorted(self.weight_map.items())}
        total = sum((self.folder / f).stat().st_size for f in renamed.values())
        index = {"metadata": {"total_size": total, **self.metadata}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------------------------------------
# The model, one layer at a time


def _set(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, name, value.device, value=value)


def _tie(model: torch.nn.Module) -> None:
    """The LM head is the input embedding again (after either was replaced)."""
    model.get_output_embeddings().weight = model.get_input_embeddings().weight


def read_module(module, reader: ShardReader, prefix: str, dtype, device="cpu", wanted=None) -> None:
    """Read ``module``'s tensors that are on the meta device from the shards (names ``prefix`` + its own), in
    ``dtype``; ``wanted(name)`` picks some of them. Running state that is never saved (an MoE block's load
    counts) starts at zero."""
    for name, tensor in module.state_dict(keep_vars=True).items():
        if tensor.is_meta and (wanted is None or wanted(name)):
            _set(module, name, reader.get(prefix + name, dtype).to(device))
    for name, buffer in module.named_buffers():
        if buffer.is_meta and (wanted is None or wanted(name)):
            _set(module, name, torch.zeros(buffer.shape, dtype=buffer.dtype, device=device))


class LayerStream:
    """What the layer-by-layer driver asks of a model that is not whole in memory: ``load(model, i)`` before
    layer i runs, ``done(model, i)`` once its outputs are computed (its tensors are written and freed). Without a
    writer (a stage that only reads the model: :func:`reading`) nothing is written, only freed."""

    def __init__(self, source: Source, writer: ShardWriter | None):
        self.source, self.reader, self.writer = source, source.reader, writer
        self.adapter, self.dtype, self.device = source.dense.adapter, source.dense_dtype, source.dense.device
        self.written: set[int] = set()
        self.released: set[str] = set()  # tensors outside the layers already written and freed

    def captured(self, dense) -> None:
        """The calibration tokens are embedded: write the input embedding out now and free it (a large
        vocabulary's table is the biggest tensor a conversion would otherwise hold to the end)."""
        name = self.source.embed_name
        if name in self.released:
            return
        if self.writer is not None:
            self.writer.add({name: dense.model.get_parameter(name).detach()})
        models = {id(m): m for m in (dense.model, self.source.dense.model)}  # a shell copy shares the table
        for model in models.values():
            _set(model, name, torch.empty(model.get_parameter(name).shape, device="meta"))
            if self.source.tied:
                _tie(model)
        self.released.add(name)

    def _prefix(self, i: int) -> str:
        return f"{self.adapter.layers_path}.{i}."

    def spills(self, dense, input_ids: torch.Tensor, copies: int = 1) -> bool:
        """Whether the hidden states of ``input_ids`` (N, T) go to disk (moe_core.layerwise.SpilledStates): when
        ``copies`` of them (one, or as many as a stage keeps at once) are more than an eighth of the source's
        max_memory. Between two layers the driver holds two
        copies (what enters a layer and what leaves it) and a conversion two more of one layer's FFN inputs and
        outputs, so at an eighth the activations stay within half the budget; spilled, only one micro-batch of the
        hidden states is in memory at a time."""
        if self.source.max_memory is None:
            return False
        width = dense.model.get_input_embeddings().weight.shape[-1]
        return copies * input_ids.numel() * width * self.dtype.itemsize > self.source.max_memory / 8

    def load(self, dense, i: int) -> None:
        """Read decoder layer i's weights from the shards into ``dense`` (a DenseModel), then check its MLP."""
        layer = self.adapter.layers(dense.model)[i]
        read_module(layer, self.reader, self._prefix(i), self.dtype, self.device)
        self.adapter.check(dense.model)  # skips the layers still on the meta device

    def done(self, dense, i: int) -> None:
        """Write decoder layer i (an MoE block or the dense MLP) to the output shards and free its weights (the
        modules stay, on the meta device: the checkpoint's layer specs are read from them at the end)."""
        layer = self.adapter.layers(dense.model)[i]
        saved = layer.state_dict()
        if self.writer is not None:
            self.writer.add({self._prefix(i) + n: t for n, t in saved.items()})
        running = {
            n: b for n, b in layer.named_buffers() if n not in saved
        }  # never saved (load counts): kept
        self.adapter.layers(dense.model)[i] = layer.to("meta")
        for name, buffer in running.items():
            _set(layer, name, buffer)
        self.written.add(i)
        _hand_back_freed_memory()

    def head(self, dense) -> None:
        """Read back what the model's head pass needs (:func:`moe_core.layerwise.head_logits` embeds its ids
        again): the input embedding freed after the capture and an LM head that was never read."""
        names = [self.source.embed_name]
        if self.source.head_name is not None and not self.source.tied:
            names.append(self.source.head_name)
        for name in names:
            if dense.model.get_parameter(name).is_meta:
                _set(dense.model, name, self.reader.get(name, self.dtype).to(self.device))
        if self.source.tied:
            _tie(dense.model)
        self.released.discard(self.source.embed_name)

    def drop_head(self, dense) -> None:
        """Free again what :meth:`head` read that the walk does not need (an untied LM head; the embedding is read
        back by the next capture's source): a stage that scored its windows hands the next one the bare shell."""
        name = self.source.head_name
        if name is not None and not self.source.tied and not dense.model.get_parameter(name).is_meta:
            _set(dense.model, name, torch.empty(dense.model.get_parameter(name).shape, device="meta"))

    def restore_source(self) -> None:
        """Read back into the source's shell what :meth:`captured` freed, so that the opened source serves another
        stage (the app keeps it open from one stage to the next)."""
        model, name = self.source.dense.model, self.source.embed_name
        if model.get_parameter(name).is_meta:
            _set(model, name, self.reader.get(name, self.dtype).to(self.device))
            if self.source.tied:
                _tie(model)

    def copy(self, i: int) -> None:
        """Layer i left as it is: its tensors go from the input shards to the output ones, never into the model."""
        prefix = self._prefix(i)
        self.writer.add(
            {n: self.reader.get(n, self.dtype) for n in self.reader.files if n.startswith(prefix)}
        )
        self.written.add(i)


_STREAM: list[LayerStream] = []  # the stream of the conversion running in this thread, if any
# glibc's malloc serves allocations above this many bytes from their own mappings, which free() hands back to
# the system at once. By default the threshold rises to the largest block freed so far (up to 32 MB), after
# which one layer's freed matrices stay in the heap, fragmented, and the next layer's land beside them: on the
# 2560 x 6912 Llama of benchmarks/scale.py a fixed threshold took the peak from 2.58 GB to 2.16 GB.
MMAP_THRESHOLD = 1 << 16
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


@functools.cache
def _libc():
    """glibc, or None (another C library, another system): the allocator is then left as it is."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _hand_back_freed_memory(first: bool = False) -> None:
    """Return the heap's free pages to the system (``malloc_trim``); the first time, also fix the mmap threshold
    (:data:`MMAP_THRESHOLD`), for the rest of the process (what a streamed stage is bounded by is its
    process's peak; allocations above 64 kB then cost a mapping each, measured in the time per layer)."""
    libc = _libc()
    if libc is None:
        return
    if first:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.malloc_trim(0)


@contextlib.contextmanager
def streaming(stream: LayerStream):
    """Inside, the layer-by-layer driver (moe_core.layerwise.convert_layers) reads and frees layers via ``stream``."""
    _hand_back_freed_memory(first=True)
    _STREAM.append(stream)
    try:
        yield stream
    finally:
        _STREAM.remove(stream)
        stream.drop_head(stream.source.dense)
        stream.restore_source()


@contextlib.contextmanager
def reading(source: Source):
    """Inside, the layer-by-layer driver (moe_core.layerwise.walk_layers) reads each decoder layer of ``source``
    from its shards before its turn and frees it after, writing nothing: for the stages that only read a model
    that does not fit in memory (profiling). Yields the model (a DenseModel shell)."""
    with streaming(LayerStream(source, None)):
        yield source.dense


def layers_of(dense, source: Source | None):
    """The model a stage that only reads it walks layer by layer: ``dense`` as it is when ``source`` is None,
    otherwise the streamed source's shell inside :func:`reading`. A context manager yielding the model."""
    return contextlib.nullcontext(dense) if source is None else reading(source)


def reread(dense):
    """The model a stage of a conversion walks once more before (or besides) the conversion's own walk, as a
    context manager: ``dense`` itself in memory, or, inside :func:`streaming`, its source read again one decoder
    layer at a time (the conversion's shell is not disturbed)."""
    stream = active()
    return layers_of(dense, None if stream is None else stream.source)


def active() -> LayerStream | None:
    return _STREAM[-1] if _STREAM else None


# ---------------------------------------------------------------------------------------------
# Opening a folder, and what may stream


@dataclass
class Source:
    """A model folder opened for streaming: the DenseModel shell (embeddings and final norm read, every decoder
    layer and an untied LM head on the meta device), its shards, and the LM head's name and tie."""

    dense: object
    reader: ShardReader
    head_name: str | None
    embed_name: str
    tied: bool
    max_memory: int | None = None  # bytes: the budget calibration activations are held to (spilled past it)

    @property
    def dense_dtype(self) -> torch.dtype:
        """The compute dtype the shell was built in (each layer is read into it)."""
        return next(iter(self.dense.model.parameters())).dtype


@torch.no_grad()
def open_model(
    folder: str | Path,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    max_memory: str | int | None = None,
) -> Source:
    """Open a model folder for streaming (:class:`Source`): only its config, tokenizer, embeddings and final norm
    are read. A converted MoE Studio folder opens with its MoE blocks in place (on the meta device too).
    max_memory ('2GB', bytes): calibration activations larger than an eighth of it go to disk
    (:meth:`LayerStream.spills`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import MOE_LAYERS, is_converted, read_json
    from .model_io import DenseModel, adapter_for_config, resolve_dtype
    from .moe import MoEMLP

    folder = Path(folder).expanduser()
    reader = ShardReader(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    adapter = adapter_for_config(config, trust_remote_code)
    torch_dtype = resolve_dtype(device, dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    if is_converted(folder):
        with torch.device("meta"):
            for i, spec in read_json(folder, MOE_LAYERS)["layers"].items():
                adapter.set_mlp(model, int(i), MoEMLP.from_spec(spec).to(torch_dtype))
    layers_prefix = adapter.layers_path + "."
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    head_name = None if head is None else f"{names[id(head)]}.weight"
    embed_name = f"{names[id(embed)]}.weight"
    # tied: the shell ties them, or the checkpoint has no head of its own (it is the embedding, saved once)
    tied = head is not None and (head.weight is embed.weight or head_name not in reader)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(layers_prefix) or name == head_name or not tensor.is_meta:
            continue
        if name not in reader:
            raise ValueError(
                f"'{folder}' has no tensor '{name}': streaming reads folders whose tensor names are the model's "
                "own (a transformers save_pretrained folder)."
            )
        _set(model, name, reader.get(name, torch_dtype).to(device))
    if tied:
        _tie(model)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    dense = DenseModel(model, tokenizer, adapter, str(folder))
    return Source(dense, reader, head_name, embed_name, tied, parse_bytes(max_memory))


def should_stream(model_cfg) -> bool:
    """Whether a conversion of ``model_cfg`` streams: a local folder of safetensors larger than max_memory."""
    limit = parse_bytes(getattr(model_cfg, "max_memory", None))
    folder = Path(model_cfg.spec).expanduser()
    if limit is None or not folder.is_dir():
        return False
    size = folder_bytes(folder)
    if size == 0:
        raise ValueError(
            f"--max-memory streams model folders of safetensors shards, and '{folder}' has none; convert it "
            "without --max-memory."
        )
    return size > limit


def check_streamable(cfg) -> None:
    """ValueError before anything is read when ``cfg`` (a ConvertRun) needs the whole model at once."""
    reasons = []
    if cfg.method == "dive" and cfg.dive.retrain.enabled:
        reasons.append("DIVE's two retraining stages train through the whole model (--stage1-steps 0 "
                       "--stage2-steps 0 converts without them: mining and experts stream)")  # fmt: skip
    if cfg.distill.enabled or cfg.finetune.enabled:
        reasons.append("distillation (on by default: --no-distill) and fine-tuning train through the whole model "
                       "(run them on a GPU that holds it, or with accelerate's CPU offload)")  # fmt: skip
    if cfg.plan is not None:
        reasons.append("a routing plan is measured on the whole model (apply it after converting)")
    if reasons:
        raise ValueError(
            "This conversion cannot stream within model.max_memory: "
            + "; ".join(reasons)
            + ". Raise or drop "
            "--max-memory to convert in memory."
        )


# ---------------------------------------------------------------------------------------------
# Writing the converted folder


def start_writer(folder: str | Path) -> tuple[ShardWriter, Path]:
    """A writer into a temporary sibling of ``folder`` (renamed into place by :func:`finish`)."""
    from .checkpoint import FORMAT, temp_folder

    tmp = temp_folder(Path(folder).expanduser())
    return ShardWriter(tmp, {"format": FORMAT}), tmp


def finish(moe, stream: LayerStream, tmp: Path, folder: str | Path, run_config: dict, metrics: dict) -> Path:
    """Copy the layers no method touched, write what is not a decoder layer (a tied head once), the configs and
    the tokenizer, then rename the folder into place. moe: the converted DenseModel (its layers on meta)."""
    from .checkpoint import FORMAT, MOE_LAYERS, VERSION, _moe_specs, _swap_into_place, _write_json

    for i in range(moe.n_layers):
        if i not in stream.written:
            stream.copy(i)
    source, layers_prefix, rest = stream.source, stream.adapter.layers_path + ".", {}
    for name, tensor in moe.model.state_dict(keep_vars=True).items():
        if (
            name.startswith(layers_prefix)
            or (name == source.head_name and source.tied)
            or name in stream.released
        ):
            continue
        rest[name] = stream.reader.get(name, stream.dtype) if name == source.head_name else tensor
    stream.writer.add(rest)
    stream.writer.close()
    moe.model.config.save_pretrained(tmp)
    moe.tokenizer.save_pretrained(tmp)
    tied = {source.head_name: source.embed_name} if source.tied else {}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": str(stream.dtype).removeprefix("torch."),
        "tied": tied,
    }
    _write_json(tmp / MOE_LAYERS, meta | {"source": moe.spec, "layers": _moe_specs(moe), "streamed": True})
    _write_json(tmp / "run_config.json", run_config)
    _write_json(tmp / "metrics.json", metrics or {})
    _swap_into_place(tmp, Path(folder).expanduser())
    return Path(folder).expanduser()
