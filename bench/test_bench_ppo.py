"""One PPO iteration (rollout + train) of a small Llama-shaped policy: ours vs a plain baseline.

Setting (issue 6, size "h256-L4", bench_full): hidden 256, MLP 688, 4 layers, 4 heads, vocab
2000, 8 prompts of 16 tokens, 48-token answers, 4 PPO epochs of one minibatch, LoRA r=16 on
q/v, fp32. Quick mode runs a tiny shape only.

Providers (group "ppo_iteration cpu <size>", throughput table; tokens = generated tokens):
- "ours": `rlhf_fast.train.ppo.PPOTrainer` on the shared base of ppo_models.py (one frozen
  base; policy, critic and reward adapters; reference = adapters disabled), fused LoRA,
  `ops.gae`, rollouts from the lean batched decoder (train/rollout_decoder.py); "ours-int8":
  the same with --rollout-quant int8 (tokens from int8 weights of the policy);
- "peer": the same algorithm written plainly on transformers + peft: four separate model
  copies (policy + LoRA, a frozen reference copy, a reward model copy + LoRA + head, a critic
  copy + LoRA + head), `generate()` for sampling, old log-probs and values recomputed by
  full forwards, the Python reversed GAE loop, unfused losses;
- "ours-bf16", "peer-bf16": ours and the plain baseline with the weights in bf16 (adapters
  and heads fp32): on a CPU with AMX-BF16 (the dev machine) bf16 GEMMs run ~3.5x fp32's;
- "ours-int4": --quant int4, the shared base itself int4 (QLoRA): the memory row;
- "trl", "trl-gcfreeze": trl 0.29.1's `trl.experimental.ppo.PPOTrainer` as shipped on the
  same policy and settings (see `trl_ppo`), and with `gc.freeze()` after setup; skipped with
  the reason when trl is not installed (not a dependency: `pip install trl==0.29.1`).

Run (2 threads, as the issue's numbers): `python -m pytest -q bench/test_bench_ppo.py -k
"ppo_iteration and h256"`; the throughput table's speedup column is relative to "ours".
"h512-L6" (hidden 512, 6 layers, vocab 8000, 96-token answers) is a shape where matrix work
dominates, as at real sizes: `-k "ppo_iteration and h512 and (ours or peer)"`.

`python bench/test_bench_ppo.py interleaved h256-L4 ours peer trl-gcfreeze 10` times the
providers in turns (10 rounds) in one process, which a drifting machine cannot bias.

Peak RSS needs a process of its own per provider: `python bench/test_bench_ppo.py PROVIDER
SIZE [ITERATIONS]` runs ITERATIONS (default 2) after a warm-up and prints the peak and the
median iteration (how trl as shipped is timed, alternating its processes with ours');
test_peak_rss_side_by_side runs both, and "sft" (one LoRA SFT step of the same policy, the
memory yardstick of the shared-base plan), and prints rollout / train tokens/s and peak RSS
side by side (numbers, never asserted).
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SHAPES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=400, prompts=4, prompt_len=8,
                 new_tokens=8, epochs=2),
    "h256-L4": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=4, vocab_size=2000, prompts=8, prompt_len=16,
                    new_tokens=48, epochs=4),
    # a shape where the matrix work dominates (as at real sizes), for the bf16 rows
    "h512-L6": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                    num_attention_heads=8, vocab_size=8000, prompts=8, prompt_len=24,
                    new_tokens=96, epochs=4),
}  # fmt: skip
SHAPE_PARAMS = [
    pytest.param(name, id=name, marks=pytest.mark.bench_full if name != "tiny" else ())
    for name in SHAPES
]
LORA_R = 16
TARGETS = ("q_proj", "v_proj")


def _tokenizer(vocab_size: int):
    """A byte-level BPE trained on random letter strings up to `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7)))
             for _ in range(20000)]  # fmt: skip
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tokenizer.train_from_iterator([" ".join(words[i : i + 50]) for i in range(0, 20000, 50)],
                                  trainer=trainer)  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="<eos>")  # fmt: skip


def scratch_dir(prefix: str) -> str:
    """A new temporary directory, removed when the process exits (the models, runs and trl
    outputs of every iteration would otherwise pile up: gigabytes over a day of benchmarks)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=2)
def model_dirs(shape: str) -> tuple[Path, Path, list[str]]:
    """(policy dir, reward-model dir on it, prompts) in a temporary directory."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    from rlhf_fast.models.load import LoraSettings, attach_lora
    from rlhf_fast.models.reward import RewardModel, save_reward_model

    spec = SHAPES[shape]
    root = Path(scratch_dir("bench_ppo_"))
    tokenizer = _tokenizer(spec["vocab_size"])
    config = LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"], max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    backbone = LlamaModel.from_pretrained(root / "policy")
    rm = RewardModel(attach_lora(backbone, LoraSettings(r=LORA_R, targets=TARGETS, fused=False)))
    save_reward_model(rm, root / "rm", base_model=root / "policy", tokenizer=tokenizer)
    rng = random.Random(1)
    prompts = [" ".join("".join(rng.choice("abcdefgh") for _ in range(3)) for _ in range(40))
               for _ in range(spec["prompts"])]  # fmt: skip
    return root / "policy", root / "rm", prompts


# ---------------------------------------------------------------------------------- ours


def ours(shape: str, rollout_quant: str = "none", dtype: str = "fp32", quant: str = "none"):
    """A callable running one PPO iteration with rlhf_fast, and its (rollout, train) clock;
    rollout_quant: --rollout-quant (int8: tokens sampled from int8 weights of the policy);
    dtype: --dtype (bf16: the frozen base and its activations in bf16, adapters in fp32);
    quant: --quant (int4: the shared base itself int4, QLoRA)."""
    from rlhf_fast.models.load import LoraSettings
    from rlhf_fast.train.config import TrainConfig
    from rlhf_fast.train.data import PromptExample
    from rlhf_fast.train.ppo import PPOTrainer
    from rlhf_fast.train.ppo_models import build_ppo_models

    spec = SHAPES[shape]
    policy, rm, prompts = model_dirs(shape)
    config = TrainConfig(
        stage="ppo", model=str(policy), data="-", reward_model=str(rm), device="cpu",
        batch_size=spec["prompts"], ppo_epochs=spec["epochs"], max_new_tokens=spec["new_tokens"],
        max_length=spec["prompt_len"] + spec["new_tokens"], lr=1e-5, temperature=1.0,
        save_every=0, max_steps=1000, rollout_quant=rollout_quant, dtype=dtype, quant=quant,
    )  # fmt: skip
    lora = LoraSettings(r=LORA_R, alpha=32, targets=TARGETS)
    models = build_ppo_models(policy, rm, lora, dtype=dtype, quant=quant)
    examples = [PromptExample([{"role": "user", "content": p}]) for p in prompts]
    trainer = PPOTrainer(config, models, examples, scratch_dir("bench_ppo_run_"))
    trainer.prompt_ids = [ids[-spec["prompt_len"] :] for ids in trainer.prompt_ids]
    clock = {"rollout": 0.0, "train": 0.0, "generated": 0, "trained": 0}
    indices = list(range(len(examples)))

    def iteration():
        start = time.perf_counter()
        experience, metrics, _ = trainer.rollout(indices, trainer.step)
        middle = time.perf_counter()
        stats = trainer.optimize(experience, trainer.step)
        clock["rollout"] += middle - start
        clock["train"] += time.perf_counter() - middle
        clock["generated"] += int(experience.response_mask.sum())
        clock["trained"] += stats["train_tokens"]
        trainer.step += 1
        return int(experience.response_mask.sum())

    return iteration, clock


# --------------------------------------------------------------------------------- plain


def _plain_gae(rewards, values, gamma=1.0, lam=0.95):
    """trl's reversed loop (right padding: rewards and values are 0 past each answer)."""
    last, reversed_advantages = 0.0, []
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def _plain_whiten(values, mask):
    mean = (values * mask).sum() / mask.sum()
    var = ((values - mean) ** 2 * mask).sum() / (mask.sum() - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def plain(shape: str, dtype: str = "fp32"):
    """The same iteration on transformers + peft, four model copies, no fused pieces; dtype
    "bf16": the four models' weights in bf16 (peft keeps the adapters in fp32), heads in fp32."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    spec = SHAPES[shape]
    policy_dir, rm_dir, prompts = model_dirs(shape)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    lora = LoraConfig(r=LORA_R, lora_alpha=32, target_modules=list(TARGETS))
    weights = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    causal_lm = functools.partial(AutoModelForCausalLM.from_pretrained, policy_dir, dtype=weights)
    backbone = functools.partial(AutoModel.from_pretrained, policy_dir, dtype=weights)
    policy = get_peft_model(causal_lm(), lora)
    reference = causal_lm().eval().requires_grad_(False)
    reward = PeftModel.from_pretrained(backbone(), rm_dir / "adapter")
    reward.eval().requires_grad_(False)
    reward_head = torch.nn.Linear(spec["hidden_size"], 1)
    reward_head.load_state_dict(load_file(rm_dir / "value_head.safetensors"))
    critic = get_peft_model(backbone(), lora)
    critic_head = torch.nn.Linear(spec["hidden_size"], 1)
    critic_head.load_state_dict(reward_head.state_dict())
    params = [p for m in (policy, critic, critic_head) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = [tokenizer(p)["input_ids"][-spec["prompt_len"] :] for p in prompts]
    query = torch.tensor(ids)
    generator_seed = [0]
    clock = {"rollout": 0.0, "train": 0.0, "generated": 0, "trained": 0}

    def logprobs_of(logits, tokens):
        return torch.gather(F.log_softmax(logits.float(), -1), 2, tokens[..., None]).squeeze(-1)

    def iteration():
        start = time.perf_counter()
        q = query.shape[1]
        with torch.no_grad():
            torch.manual_seed(generator_seed[0])
            generator_seed[0] += 1
            policy.eval()
            sequences = policy.generate(
                input_ids=query, attention_mask=torch.ones_like(query), do_sample=True,
                max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"],
                top_k=0, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            response = sequences[:, q:]
            attention = torch.ones_like(sequences)
            old_logprobs = logprobs_of(policy(sequences).logits[:, q - 1 : -1], response)
            ref_logprobs = logprobs_of(reference(sequences).logits[:, q - 1 : -1], response)
            hidden = critic(sequences, attention_mask=attention).last_hidden_state
            values = critic_head(hidden[:, q - 1 : -1].float()).squeeze(-1)
            last = reward(sequences, attention_mask=attention).last_hidden_state[:, -1]
            scores = reward_head(last.float()).squeeze(-1)
            rewards = -0.05 * (old_logprobs - ref_logprobs)
            rewards[:, -1] += scores
            advantages, returns = _plain_gae(rewards, values)
            mask = torch.ones_like(advantages)
            advantages = _plain_whiten(advantages, mask)
        middle = time.perf_counter()
        policy.train()
        trained = 0
        for _ in range(spec["epochs"]):
            optimizer.zero_grad()
            logits = policy(sequences).logits[:, q - 1 : -1]
            new_logprobs = logprobs_of(logits, response)
            ratio = torch.exp(new_logprobs - old_logprobs)
            pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2)).mean()
            new_values = critic_head(critic(sequences).last_hidden_state[:, q - 1 : -1].float())
            new_values = new_values.squeeze(-1)
            clipped = values + (new_values - values).clamp(-0.2, 0.2)
            vf = 0.5 * torch.max((new_values - returns) ** 2, (clipped - returns) ** 2).mean()
            (pg + 0.1 * vf).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            trained += sequences.numel()
        clock["rollout"] += middle - start
        clock["train"] += time.perf_counter() - middle
        clock["generated"] += response.numel()
        clock["trained"] += trained
        return response.numel()

    return iteration, clock


def trl_ppo(shape: str, freeze_gc: bool = False):
    """trl 0.29.1's `trl.experimental.ppo.PPOTrainer` as shipped on the same policy, prompts and
    settings: LoRA r=16 on q/v of the policy (its reference = adapters disabled), reward and
    value models LlamaForSequenceClassification of the same shape (trl trains its value model
    in full), whole-batch minibatches, 48-token answers, fp32 on the CPU. One call = one
    `train()` of one update. freeze_gc: `gc.freeze()` after setup, so the two gc.collect()
    calls of each trl update only walk the objects made since (the issue's second trl number).
    Skipped when trl is not installed (it is not a dependency: pip install trl==0.29.1)."""
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError as error:
        pytest.skip(f"trl peer: trl.experimental.ppo does not import ({error}); "
                    "pip install trl==0.29.1 to measure it")  # fmt: skip
    import gc
    import logging

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        PrinterCallback,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    spec = SHAPES[shape]
    policy_dir, _, prompts = model_dirs(shape)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    ids = [tokenizer(p)["input_ids"][-spec["prompt_len"] :] for p in prompts]

    def scorer():
        model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    config = PPOConfig(
        output_dir=scratch_dir("bench_ppo_trl_"), per_device_train_batch_size=
        spec["prompts"], gradient_accumulation_steps=1, num_mini_batches=1,
        num_ppo_epochs=spec["epochs"], response_length=spec["new_tokens"],
        local_rollout_forward_batch_size=spec["prompts"], total_episodes=spec["prompts"],
        learning_rate=1e-5, lr_scheduler_type="constant", temperature=1.0, stop_token=None,
        num_sample_generations=0, report_to=[], save_strategy="no", logging_steps=10**6,
        disable_tqdm=True, use_cpu=True, bf16=False, seed=0,
    )  # fmt: skip
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(policy_dir), ref_model=None,
        reward_model=scorer(), value_model=scorer(),
        train_dataset=Dataset.from_dict({"input_ids": ids}),
        peft_config=LoraConfig(r=LORA_R, lora_alpha=32, target_modules=list(TARGETS)),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # the metrics dict printed every update
    if freeze_gc:
        gc.collect()
        gc.freeze()
    clock = {"rollout": 0.0, "train": 0.0, "generated": 0, "trained": 0}
    tokens = spec["prompts"] * spec["new_tokens"]

    def iteration():
        start = time.perf_counter()
        trainer.train()
        clock["train"] += time.perf_counter() - start  # trl times no phases: all under train
        clock["generated"] += tokens
        clock["trained"] += tokens * spec["epochs"]
        return tokens

    return iteration, clock


def sft_step(shape: str):
    """For the memory comparison only: one LoRA SFT step (forward, backward, AdamW) of the
    same policy on the same rows (prompt + answer), with the trainer's own loss."""
    from rlhf_fast.models.load import LoraSettings, attach_lora, load_causal_lm
    from rlhf_fast.train.sft import token_loss

    spec = SHAPES[shape]
    policy_dir, _, _ = model_dirs(shape)
    model = attach_lora(load_causal_lm(policy_dir), LoraSettings(r=LORA_R, targets=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    width = spec["prompt_len"] + spec["new_tokens"]
    ids = torch.randint(2, spec["vocab_size"], (spec["prompts"], width))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    clock = {"rollout": 0.0, "train": 0.0, "generated": 0, "trained": 0}

    def iteration():
        start = time.perf_counter()
        optimizer.zero_grad()
        token_loss(model, batch).backward()
        optimizer.step()
        clock["train"] += time.perf_counter() - start
        clock["trained"] += ids.numel()
        return ids.numel()

    return iteration, clock


PROVIDERS = {
    "ours": ours,
    "ours-int8": functools.partial(ours, rollout_quant="int8"),
    "peer": plain,
    "ours-bf16": functools.partial(ours, dtype="bf16"),
    "peer-bf16": functools.partial(plain, dtype="bf16"),
    "ours-int4": functools.partial(ours, quant="int4"),
    "trl": trl_ppo,
    "trl-gcfreeze": functools.partial(trl_ppo, freeze_gc=True),
}
# sft: the memory yardstick, not timed; trl: skipped (a row saying why) when not installed
MEMORY_PROVIDERS = {
    "ours": ours,
    "ours-int4": functools.partial(ours, quant="int4"),
    "peer": plain,
    "trl": trl_ppo,
    "sft": sft_step,
}


# quick mode: ours and the plain baseline only (trl's setup alone takes seconds)
PROVIDER_PARAMS = [
    pytest.param(
        name, id=name, marks=pytest.mark.bench_full if name not in ("ours", "peer") else ()
    )
    for name in PROVIDERS
]


@pytest.mark.parametrize("shape", SHAPE_PARAMS)
@pytest.mark.parametrize("provider", PROVIDER_PARAMS)
def test_ppo_iteration(measure, shape, provider):
    iteration, _ = PROVIDERS[provider](shape)
    generated = iteration()  # warm-up; also the tokens of one call (all answers run full)
    spec = SHAPES[shape]
    measure(iteration, op="ppo_iteration", device="cpu", size=shape, provider=provider,
            tokens=max(generated, spec["prompts"]))  # fmt: skip


@pytest.mark.bench_full  # a process per provider: too slow for quick mode
@pytest.mark.parametrize("shape", list(SHAPES))
def test_peak_rss_side_by_side(shape, capsys):
    rows = []
    for provider in MEMORY_PROVIDERS:
        run = subprocess.run([sys.executable, __file__, provider, shape], capture_output=True,
                             text=True, timeout=900, env={**os.environ})  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    with capsys.disabled():
        print(f"\nPPO iteration, {shape}, {torch.get_num_threads()} threads (median of 2 "
              "iterations after one warm-up, each provider in its own process):")  # fmt: skip
        for row in rows:
            if "skipped" in row:
                print(f"  {row['provider']:9s} skipped: {row['skipped']}")
                continue
            rollout = row["rollout_tok_s"]  # None: the provider times no separate rollout
            print("  {provider:9s} rollout {rollout} generated tok/s  train {train_tok_s:7.0f} "
                  "tok/s  iteration {iteration_s:6.3f} s  peak RSS {peak_rss_mib:6.0f} MiB"
                  .format(**{**row, "rollout": "      -" if rollout is None else
                             f"{rollout:7.0f}"}))  # fmt: skip


def _one_process(provider: str, shape: str, iterations: int = 2) -> dict:
    """Peak RSS and the median iteration time over `iterations` after one warm-up, in this
    process (trl as shipped is timed this way: see interleaved)."""
    torch.manual_seed(0)
    iteration, clock = MEMORY_PROVIDERS[provider](shape)
    iteration()
    for key in clock:
        clock[key] = 0
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - started)
    return {
        "provider": provider,
        "rollout_tok_s": clock["generated"] / clock["rollout"] if clock["rollout"] else None,
        "train_tok_s": clock["trained"] / max(clock["train"], 1e-9),
        "iteration_s": statistics.median(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def interleaved(shape: str, providers: list[str], rounds: int) -> None:
    """Times the providers in turns, one iteration each per round, in one process: on the dev
    machine (a VM) speed drifts by +-30% over minutes, so a provider timed in a block of its
    own can land in a slow or fast stretch; in turns each sees the same drift, and the medians'
    ratios hold. Not for "trl" as shipped: its gc.collect() calls would also walk the other
    providers' objects ("trl-gcfreeze" freezes them all)."""
    if "trl" in providers:
        raise SystemExit("interleaved: trl's gc.collect() walks every provider's objects")
    calls = {}
    for name in providers:
        torch.manual_seed(0)
        calls[name] = PROVIDERS[name](shape)[0]
        calls[name]()  # warm-up
    gc.collect()
    gc.freeze()  # trl-gcfreeze's setting, for everyone
    times = {name: [] for name in providers}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    first = statistics.median(times[providers[0]])
    print(f"PPO iteration, {shape}, {torch.get_num_threads()} threads, {rounds} rounds in turns:")
    for name in providers:
        median = statistics.median(times[name])
        print(f"  {name:13s} median {median:6.3f} s  (min {min(times[name]):6.3f})  "
              f"{first / median:5.2f}x the speed of {providers[0]}")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if sys.argv[1] == "interleaved":  # interleaved SIZE PROVIDER... [ROUNDS]
        names = [a for a in sys.argv[3:] if not a.isdigit()]
        counts = [int(a) for a in sys.argv[3:] if a.isdigit()]
        interleaved(sys.argv[2], names, counts[0] if counts else 10)
        raise SystemExit(0)
    try:
        # PROVIDER SIZE [ITERATIONS]
        iterations = int(sys.argv[3]) if len(sys.argv) > 3 else 2
        print(json.dumps(_one_process(sys.argv[1], sys.argv[2], iterations)))
    except pytest.skip.Exception as skipped:
        print(json.dumps({"provider": sys.argv[1], "skipped": str(skipped)}))
