"""moe_core: turn a dense decoder LLM into a Mixture-of-Experts model (CMoE, DIVE, LaDiMo).

Importing this package is cheap: heavy modules (transformers, peft, lm-eval, plotly) load lazily.
"""

from .profiling import Cancelled

__all__ = ["Cancelled"]
__version__ = "0.1.0"
