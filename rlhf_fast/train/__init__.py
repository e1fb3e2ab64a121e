"""The trainer: data layer (data.py), stages (sft.py, rm.py, ppo.py), run directory and CLI.

Import what you need from the submodules (`from rlhf_fast.train.data import read_sft`); this
package imports nothing itself, so that `import rlhf_fast.train.x` stays cheap.
"""
