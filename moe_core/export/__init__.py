"""Export a converted model as a checkpoint other tools load, with a measured fidelity report.

Formats (``ExportConfig.format``):

- ``portable`` (default): ``Qwen2MoeForCausalLM``, a stock transformers class that vLLM also serves; no
  remote code. Exact where the routing is representable, otherwise approximated (fitted linear router,
  constants folded into the experts) and measured. See export/native.py and export/routing.py.
- ``exact``: safetensors plus ``modeling_moe_studio.py`` named in config.json's ``auto_map``: the source
  family's transformers class with MoE Studio's MoE blocks; loads with ``trust_remote_code=True``.
- ``llamacpp``: Qwen2-MoE in the subset llama.cpp's ``qwen2moe`` graph runs (reference/ecosystem.md §A.6.3):
  untied embeddings, raw-softmax weights (``norm_topk_prob=false``), dense layers as shared-only MoE layers;
  refused with the reason where llama.cpp cannot run the source model (e.g. llama3 RoPE scaling).
- ``gguf``: that llama.cpp layout written as one ``<name>.gguf`` (f16, q8_0 or f32: ``gguf_type``) by
  export/gguf.py, next to config.json and the tokenizer; run it with ``llama-cli -m`` / ``llama-server -m``.

Every export is reloaded with ``AutoModelForCausalLM.from_pretrained`` in a clean Python process (no moe_core
import) and compared with the internal model on fixed tokens: max |logit difference|, KL, top-1 agreement,
perplexity, greedy generation (a GGUF through transformers' GGUF loader, and read back with GGUFReader: names,
shapes, metadata, de-quantised weights). The numbers go into README.md (the model card) and metrics.json; the folder
is written as ``<out>.partial`` and renamed when complete; :func:`make_zip` packs it for download.

A converted folder larger than memory exports one decoder layer at a time (export/streamed.py, every format),
checked layer by layer or by its structure instead of a whole reload.
"""

from .card import make_zip, model_card
from .config import EXACT_TOL, FORMATS, GGUF_TYPES, ExportConfig, ExportResult
from .formats import export_model, write_exact, write_native
from .native import ExportError
from .verify import compare, reload_logits, verify

__all__ = [
    "EXACT_TOL",
    "FORMATS",
    "GGUF_TYPES",
    "ExportConfig",
    "ExportError",
    "ExportResult",
    "compare",
    "export_model",
    "make_zip",
    "model_card",
    "reload_logits",
    "verify",
    "write_exact",
    "write_native",
]
