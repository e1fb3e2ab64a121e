import os

import torch

# Never let a test reach for the Hugging Face hub (it would hang ~25 s before failing).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Without a GPU, Triton kernels can only run in its interpreter, and triton reads this
# variable once, when it is first imported: set it before any test can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
