"""The trainer's data layer in one import: readers, examples, encoders and collators.

Where each lives:
    read_sft / read_rm / read_prompts (data_read.py)   JSONL -> examples, every line checked
    split_held_out (data_read.py)                      seeded train / held-out split
    encode_sft / encode_response (data_encode.py)      examples -> token ids (+ labels)
    SFTCollator / RankCollator / ScoreCollator         token ids -> padded tensors
    packing_isolates (data_pack.py)                    may this model pack SFT examples?
"""

from rlhf_fast.models.prompt_format import TemplateError
from rlhf_fast.train.data_collate import RankCollator, ScoreCollator, SFTCollator
from rlhf_fast.train.data_encode import (
    IGNORE_INDEX,
    encode_ranking,
    encode_response,
    encode_scored,
    encode_sft,
    eos_token_id,
    pad_token_id,
)
from rlhf_fast.train.data_examples import (
    DataError,
    PromptExample,
    RankExample,
    ScoreExample,
    SFTExample,
)
from rlhf_fast.train.data_pack import packing_isolates
from rlhf_fast.train.data_read import read_prompts, read_rm, read_sft, split_held_out

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "PromptExample",
    "RankCollator",
    "RankExample",
    "SFTCollator",
    "SFTExample",
    "ScoreCollator",
    "ScoreExample",
    "TemplateError",
    "encode_ranking",
    "encode_response",
    "encode_scored",
    "encode_sft",
    "eos_token_id",
    "packing_isolates",
    "pad_token_id",
    "read_prompts",
    "read_rm",
    "read_sft",
    "split_held_out",
]
