"""peft integration: fused LoRA forward/backward on dense or quantized bases.

- `fuse(model)` / `unfuse(model)`: every peft LoRA Linear (and GPT-2 Conv1D) layer of a peft
  model runs `rlhf_fast.ops.lora_linear` instead of peft's unfused forward; `unfuse` undoes it.
- `prepare_qlora(model, bits=4, ...)`: quantize the frozen base (`rlhf_fast.quant`) and attach
  peft LoRA adapters that train on it; adapters save and load as plain peft directories.
"""

from rlhf_fast.lora.fuse import fuse, is_fused, unfuse
from rlhf_fast.lora.qlora import QuantLoraLinear, prepare_qlora, qlora_config

__all__ = ["QuantLoraLinear", "fuse", "is_fused", "prepare_qlora", "qlora_config", "unfuse"]
