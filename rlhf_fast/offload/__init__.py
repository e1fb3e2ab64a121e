"""FlexGen-style offloading: decoder layers stream from per-layer shards on disk.

prepare_offload (prepare.py) writes an offload directory once; load_offloaded (model.py) opens
it as an HF model whose layers a LayerStreamer (streamer.py) binds just in time, reading ahead
on a background thread; generate_batch (generate.py) runs FlexGen's block schedule, its KV
cache optionally 4-bit (kv_cache.py); policy.py chooses the placement from memory budgets with a
calibrated cost model. int4 layers follow the int4 activation rule (quant/activations.py: bf16
for products of >= 32 rows; on for generation and chat, off for training and PPO rollouts).
Training: attach_offload_lora (lora.py) puts LoRA adapters on the streamed base, whose layers
backward.py re-streams in reverse for the backward; training.py and rollout.py are the
trainer's hooks (`rlhf-fast train --offload`).
"""

from rlhf_fast.offload.lora import attach_offload_lora
from rlhf_fast.offload.model import OffloadedLM, load_offloaded
from rlhf_fast.offload.prepare import prepare_offload
from rlhf_fast.offload.shards import ShardError

__all__ = ["OffloadedLM", "ShardError", "attach_offload_lora", "load_offloaded", "prepare_offload"]
