import os

# Never let a test reach for the Hugging Face hub (it would hang ~25 s before failing).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
