"""deltawise: adapt pretrained models without forgetting, working in weight space.

Everything is a delta: a fine-tuned model is ``base + delta``. This package merges,
compresses, transfers and audits such deltas over Hugging Face formats.
"""

import os

from deltawise.errors import DeltawiseError

# transformers 5 fetches compiled "hub kernels" (kernels-community/*) from the Hugging Face hub and runs them when a
# model runs on a GPU: code from outside the model folder, downloaded at run time, never asked for. Off unless the
# user turns them on with USE_HUB_KERNELS=YES (docs/safety.md); offline, they made every GPU training run fail.
os.environ.setdefault("USE_HUB_KERNELS", "NO")

__version__ = "0.1.0"
__all__ = ["DeltawiseError", "__version__"]
