"""The built-in demo of `rlhf-fast train`: a judged task (task.py), its tokenizer and tiny
model (model.py), and the held-out judge score of a policy (evaluate.py)."""
