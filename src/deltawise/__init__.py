"""deltawise: adapt pretrained models without forgetting, working in weight space.

Everything is a delta: a fine-tuned model is ``base + delta``. This package merges,
compresses, transfers and audits such deltas over Hugging Face formats.
"""

from deltawise.errors import DeltawiseError

__version__ = "0.1.0"
__all__ = ["DeltawiseError", "__version__"]
