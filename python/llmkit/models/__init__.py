"""llmkit.models: transformer families on llmkit's attention kernels.

:class:`GPT` (GPT-2 and Llama-style decoders). Every family loads and writes
Hugging Face checkpoints (``from_hf`` / ``to_hf``) with identical logits.
"""

from .common import ModelOutput
from .gpt import GPT, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache", "ModelOutput"]
