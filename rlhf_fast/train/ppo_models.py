"""PPO's four roles on one frozen base model (the shared-base memory plan).

The SFT model (merged: an SFT adapter directory is merged on load) is loaded once, frozen, and
wrapped by peft with several LoRA adapters on the same layers:

    policy      adapter "default" + the LM head               trained
    reference   the same model with adapters disabled         exactly the SFT model, no copy
    critic      adapter "critic" + a value head per token     trained; starts as the reward model
    reward      adapter "reward" + the reward head            frozen; read from the RM directory

One adapter is active at a time (`PPOModels.use(name)`), so each forward costs what one LoRA
model costs and the memory is one base plus four adapters. Where the roles score the same
rows, they run as one pass instead, each block of rows with its own adapter (lora.row_groups):
the training step's policy and critic (`policy_and_critic`), and a rollout's reference,
critic and reward (`stacked_hidden`; without the critic where the rollout runs the first
epoch's `policy_and_critic` itself: ppo.py); each layer's fixed costs are then paid once.

The reward model shares the base when `--stage rm` trained it on this very directory
(reward_config.json's base_model) in adapter form; otherwise (another base, another
tokenizer, a merged RM) it is loaded on its own and fed the decoded text re-tokenized with its
own tokenizer, and the critic starts from a fresh adapter with the reward head's weights when
the widths match.

The RM adapter was saved from the bare decoder (AutoModel), the policy wraps the causal LM: the
same layers sit one attribute deeper (`base_model_prefix`), so its keys are renamed on loading.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from rlhf_fast.lora.qlora import qlora_config
from rlhf_fast.lora.row_groups import adapters_by_rows, lora_layers
from rlhf_fast.lora.row_groups import unsupported_reason as rows_unsupported_reason
from rlhf_fast.models.load import (
    LoraSettings,
    ModelLoadError,
    attach_lora,
    check_model_dir,
    load_causal_lm,
    load_tokenizer,
)
from rlhf_fast.models.prompt_format import prompt_token_ids, response_token_ids
from rlhf_fast.models.reward import (
    ADAPTER_DIR,
    HEAD_FILE,
    RewardModel,
    last_token_index,
    load_reward_model,
    read_reward_config,
)
from rlhf_fast.train.data_encode import truncate
from rlhf_fast.train.rollout import response_logits

POLICY, CRITIC, REWARD = "default", "critic", "reward"


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only (left-padded prompts, right-padded answers)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def decoder_of(causal_lm: nn.Module) -> nn.Module:
    """The decoder (hidden states, no LM head) inside a causal LM: LlamaModel, GPT2Model, ..."""
    return getattr(causal_lm, causal_lm.base_model_prefix)


def disable_dropout(module: nn.Module) -> int:
    """Set every dropout inside `module` to 0 (nn.Dropout modules, LoRA's included, and the
    float rates that HF attention and decoder layers pass to F.dropout); returns how many.

    PPO compares log-probs and values of the training forward with those the rollout stored,
    which were computed without dropout: with dropout on, the ratios start away from 1."""
    changed = 0
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            changed += sub.p != 0
            sub.p = 0.0
            continue
        for name, value in vars(sub).items():
            if "dropout" in name and isinstance(value, float):
                changed += value != 0
                setattr(sub, name, 0.0)
    return changed


@dataclass
class RewardSource:
    """How the reward model was set up (reported in the run summary)."""

    shared: bool
    directory: Path


class PPOModels(nn.Module):
    """One base, four roles; see the module docstring."""

    def __init__(self, peft_model, critic_head: nn.Linear, tokenizer) -> None:
        super().__init__()
        self.model = peft_model  # the policy's peft model; adapters: default, critic(, reward)
        self.critic_head = critic_head
        self.tokenizer = tokenizer
        self.reward_head: nn.Linear | None = None  # shared reward model
        self.separate_reward: RewardModel | None = None  # a reward model of its own
        self.reward_tokenizer = None
        self.reward_source: RewardSource | None = None
        self._trainable: dict[str, nn.Parameter] = {}
        self._active: str | None = None
        self._stacks_roles: bool | None = None  # decided on first use: stacks_roles()
        self._row_layers: list | None = None  # the LoRA layers, found on first use

    def train(self, mode: bool = True) -> PPOModels:
        """nn.Module.train, skipped where every module is already in `mode`: a switch sets
        `training` on every module through Module.__setattr__ (~1.4 ms on the PPO bench's
        4-layer policy, where a step would otherwise switch seven times)."""
        if all(module.training == mode for module in self.modules()):
            return self
        return super().train(mode)

    def _lora_layers(self) -> list:
        """The shared model's LoRA layers, kept: build_ppo_models adds every adapter before
        the first stacked pass, and adapters live inside these layers."""
        if self._row_layers is None:
            self._row_layers = lora_layers(self.model)
        return self._row_layers

    # ------------------------------------------------------------------ adapters

    def use(self, adapter: str) -> None:
        """Make `adapter` the active one; keeps the policy and critic trainable (peft's
        set_adapter would freeze every adapter but the active one). Switching walks every
        module, so it is skipped when `adapter` is already the active one."""
        if self._active == adapter:
            return
        self.model.base_model.set_adapter(adapter, inference_mode=True)
        for param in self._trainable.values():
            param.requires_grad_(True)
        self._active = adapter

    def trainable(self) -> dict[str, nn.Parameter]:
        """Policy adapter, critic adapter and critic head, by stable names."""
        return self._trainable

    def _collect_trainable(self) -> None:
        found = {}
        for name, param in self.model.named_parameters():
            if "lora_" in name and (f".{POLICY}." in name or f".{CRITIC}." in name):
                found[name] = param
        for name, param in self.critic_head.named_parameters():
            found[f"critic_head.{name}"] = param
        self._trainable = found
        for param in self.parameters():
            param.requires_grad_(False)
        for param in found.values():
            param.requires_grad_(True)

    @property
    def decoder(self) -> nn.Module:
        return decoder_of(self.model.get_base_model())

    def reference(self):
        """Context: the policy with every adapter disabled, i.e. the SFT model."""
        return self.model.disable_adapter()

    # ------------------------------------------------------------------ forwards

    def _positions(self, module: nn.Module, mask: torch.Tensor) -> dict:
        """position_ids for models that take them (ALiBi models such as BLOOM take none)."""
        base = module.get_base_model() if hasattr(module, "get_base_model") else module
        takes = "position_ids" in inspect.signature(base.forward).parameters
        return {"position_ids": positions_of(mask)} if takes else {}

    def policy_logits(
        self, sequences: torch.Tensor, mask: torch.Tensor, query_width: int | None = None
    ) -> torch.Tensor:
        """The policy's logits [B, T, V]; with `query_width`, only those [B, R, V] that predict
        the response tokens (the LM head runs on those positions only: rollout.response_logits),
        as critic_values gives the values of the same positions."""
        self.use(POLICY)
        if query_width is not None:
            q = query_width
            return response_logits(self.model, sequences[:, :q], mask[:, :q], sequences[:, q:],
                                   mask[:, q:])  # fmt: skip
        output = self.model(input_ids=sequences, attention_mask=mask.long(),
                            **self._positions(self.model, mask))  # fmt: skip
        return output.logits

    def _hidden(self, sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        output = self.decoder(input_ids=sequences, attention_mask=mask.long(),
                              **self._positions(self.decoder, mask))  # fmt: skip
        return output.last_hidden_state

    def critic_values(self, sequences: torch.Tensor, mask: torch.Tensor, query_width: int):
        """Values [B, R] of the states before each response token (the positions whose logits
        predict the response tokens)."""
        self.use(CRITIC)
        return self.values_of(self._hidden(sequences, mask), query_width)

    def policy_and_critic(
        self, sequences: torch.Tensor, mask: torch.Tensor, query_width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy_logits(..., query_width), critic_values(..., query_width)) from one pass of
        the two roles stacked as one batch (lora.row_groups: each block of rows with its own
        adapter), where the model allows it (`stacks_roles`); else two passes."""
        if not self.stacks_roles():
            logits = self.policy_logits(sequences, mask, query_width)
            return logits, self.critic_values(sequences, mask, query_width)
        rows, q = sequences.shape[0], query_width
        self.use(POLICY)  # the LM head runs outside the stacked pass, as the policy's
        with adapters_by_rows(self.model, [(POLICY, rows), (CRITIC, rows)], self._lora_layers()):
            hidden = self._hidden(torch.cat([sequences, sequences]), torch.cat([mask, mask]))
        return self.response_logits_of(hidden[:rows], q), self.values_of(hidden[rows:], q)

    @torch.no_grad()
    def stacked_hidden(
        self, sequences: torch.Tensor, mask: torch.Tensor, roles: list[str | None]
    ) -> list[torch.Tensor]:
        """The decoder's last hidden states [B, T, H] of `sequences` under each of `roles`
        (an adapter, or None: adapters disabled, the reference), from one pass of the rows
        stacked len(roles) times; stacks_roles() must be true."""
        rows, count = sequences.shape[0], len(roles)
        with adapters_by_rows(self.model, [(role, rows) for role in roles], self._lora_layers()):
            hidden = self._hidden(sequences.repeat(count, 1), mask.repeat(count, 1))
        return list(hidden.split(rows))

    def response_logits_of(self, hidden: torch.Tensor, query_width: int) -> torch.Tensor:
        """The LM head's logits [B, R, V] at the positions that predict the response tokens
        (a contiguous copy of those states: a strided [B, R, H] slice would multiply by the
        head through bmm on an expanded weight, see rollout.response_logits)."""
        return self.model.get_output_embeddings()(hidden[:, query_width - 1 : -1].contiguous())

    def values_of(self, hidden: torch.Tensor, query_width: int) -> torch.Tensor:
        """The critic head's values [B, R] of the states before each response token."""
        return self.critic_head(hidden[:, query_width - 1 : -1].float()).squeeze(-1)

    def scores_of(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The shared reward head's scores [B] at each row's last real token."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.reward_head(hidden[rows, last_token_index(mask.long())].float()).squeeze(-1)

    def stacks_roles(self) -> bool:
        """Whether the roles run as one stacked pass (policy_and_critic, stacked_hidden): the
        adapters are plain LoRA (row_groups.unsupported_reason), the base is not streamed
        (offload runs layers its own way), the LM head is a plain nn.Linear (an adapter of its
        own would give the reference's rows the policy's), and on a 2 x 4-token probe the
        stacked pass gives what the two passes give (it would not where the LM head is more
        than the output embedding of the last hidden state, e.g. logit soft-capping, or where
        a model puts positions before rows). Decided once."""
        if self._stacks_roles is None:
            self._stacks_roles = (
                getattr(self.model, "rlhf_fast_offload", None) is None
                and rows_unsupported_reason(self.model, [POLICY, CRITIC, self._shared_reward()])
                is None
                and isinstance(self.model.get_output_embeddings(), nn.Linear)
                and self._stacked_pass_agrees()
            )
        return self._stacks_roles

    def _shared_reward(self) -> str | None:
        return REWARD if self.reward_head is not None else None

    @torch.no_grad()
    def _stacked_pass_agrees(self) -> bool:
        device = self.model.get_output_embeddings().weight.device
        ids = torch.arange(8, device=device).view(2, 4) % self.model.config.vocab_size
        mask = torch.ones_like(ids, dtype=torch.bool)
        was_training, active = self.training, self._active
        self.eval()
        try:
            self._stacks_roles = True
            stacked = self.policy_and_critic(ids, mask, 2)
            self._stacks_roles = False
            separate = self.policy_and_critic(ids, mask, 2)
        finally:
            self._stacks_roles = None
            self.train(was_training)
            if active is not None:  # the two passes leave the critic's adapter active
                self.use(active)
        return all(
            a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4)
            for a, b in zip(stacked, separate, strict=True)
        )

    @torch.no_grad()
    def scores(
        self, sequences: torch.Tensor, mask: torch.Tensor, texts=None, max_length: int | None = None
    ) -> torch.Tensor:
        """Reward-model scores [B] of whole rows (prompt + answer): the shared reward adapter
        on token ids, or the separate reward model on `texts` [(messages, answer, ended)],
        re-tokenized and, with `max_length`, cut as its training data was (the prompt from
        the left first: data_encode.truncate)."""
        if self.separate_reward is not None:
            return self._separate_scores(texts, sequences.device, max_length)
        self.use(REWARD)
        try:
            return self.scores_of(self._hidden(sequences, mask), mask)
        finally:
            self.use(POLICY)

    def _separate_scores(self, texts, device, max_length: int | None = None) -> torch.Tensor:
        tokenizer = self.reward_tokenizer
        rows = []
        for messages, answer, ended in texts:
            prompt = prompt_token_ids(tokenizer, messages)
            answer_ids = response_token_ids(tokenizer, answer)
            answer_ids += [tokenizer.eos_token_id] if ended else []
            if max_length is not None:
                prompt, answer_ids = truncate(prompt, answer_ids, max_length)
            rows.append(prompt + answer_ids)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        model_device = next(self.separate_reward.parameters()).device
        return self.separate_reward(ids.to(model_device), mask.to(model_device)).to(device)


# ---------------------------------------------------------------------- building


def _rename_for_causal_lm(state: dict[str, torch.Tensor], prefix: str) -> dict:
    """Keys of an adapter saved on the bare decoder, as the causal-LM wrapper names them."""
    head = "base_model.model."
    return {
        (head + prefix + "." + key[len(head) :] if key.startswith(head) else key): value
        for key, value in state.items()
    }


def _add_shared_reward(models: PPOModels, rm_dir: Path, device: str) -> nn.Linear:
    """Load the RM's adapter as "reward" onto the policy's base; returns the reward head."""
    from peft import LoraConfig, set_peft_model_state_dict

    adapter_dir = rm_dir / ADAPTER_DIR
    try:
        lora_config = LoraConfig.from_pretrained(str(adapter_dir))
        state = load_file(adapter_dir / "adapter_model.safetensors")
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelLoadError(f"{adapter_dir}: cannot load the adapter ({reason})") from None
    lora_config.inference_mode = True
    # a base whose layers are QuantLinear (an int4/int8 streamed one) needs QLoRA's layer class
    models.model.add_adapter(REWARD, qlora_config(lora_config))
    prefix = models.model.get_base_model().base_model_prefix
    result = set_peft_model_state_dict(
        models.model, _rename_for_causal_lm(state, prefix), adapter_name=REWARD
    )
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ModelLoadError(f"{adapter_dir}: adapter weight {unexpected[0]} fits no layer")
    head = nn.Linear(models.critic_head.in_features, 1, dtype=torch.float32)
    head.load_state_dict(load_file(rm_dir / HEAD_FILE))
    return head.to(device).requires_grad_(False)


def _init_critic_from_reward(models: PPOModels, lora_config) -> None:
    """Critic adapter = a copy of the reward adapter (same config and weights)."""
    models.model.add_adapter(CRITIC, copy.deepcopy(lora_config))
    params = dict(models.model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if f".{CRITIC}." in name and "lora_" in name:
                param.copy_(params[name.replace(f".{CRITIC}.", f".{REWARD}.")])
    models.critic_head.load_state_dict(models.reward_head.state_dict())


def _reward_tokenizer(rm_dir: Path):
    """The RM directory's own tokenizer (saved beside its head), else its base model's."""
    if (rm_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            rm_dir, local_files_only=True, trust_remote_code=False
        )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return load_tokenizer(read_reward_config(rm_dir)["base_model"])


def shares_base(model_dir: str | Path, rm_dir: str | Path) -> bool:
    """Whether the RM directory is an adapter trained on exactly this base directory."""
    config = read_reward_config(rm_dir)
    if config["backbone"] != "adapter":
        return False
    return Path(config["base_model"]).resolve() == check_model_dir(model_dir)


def build_ppo_models(
    model_dir: str | Path,
    rm_dir: str | Path,
    lora: LoraSettings,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    quant: str = "none",
    seed: int = 0,
    share_reward: bool = True,
    base: nn.Module | None = None,
    attach=attach_lora,
) -> PPOModels:
    """Load the base once and set up the four roles (see the module docstring). `base`: an
    already loaded frozen causal LM to use instead, and `attach(base, lora)` its way to a peft
    model (an offloaded base: rlhf_fast.offload.training). quant: "int8" / "int4" quantizes
    the shared base on load (QLoRA; a separate reward model too)."""
    rm_dir = Path(rm_dir)
    read_reward_config(rm_dir)  # a clear error before the (slow) base load
    tokenizer = load_tokenizer(model_dir)
    if base is None:
        base = load_causal_lm(model_dir, dtype=dtype, device=device, quant=quant)
    torch.manual_seed(seed)
    peft_model = attach(base, lora)
    hidden = decoder_of(base).get_input_embeddings().embedding_dim
    critic_head = nn.Linear(hidden, 1, dtype=torch.float32).to(device)
    nn.init.zeros_(critic_head.weight)
    nn.init.zeros_(critic_head.bias)
    models = PPOModels(peft_model, critic_head, tokenizer)
    if share_reward and shares_base(model_dir, rm_dir):
        models.reward_head = _add_shared_reward(models, rm_dir, device)
        _init_critic_from_reward(models, models.model.peft_config[REWARD])
        models.reward_source = RewardSource(True, rm_dir)
    else:
        models.separate_reward = load_reward_model(rm_dir, dtype=dtype, device=device, quant=quant)
        models.reward_tokenizer = _reward_tokenizer(rm_dir)
        models.model.add_adapter(CRITIC, copy.deepcopy(models.model.peft_config[POLICY]))
        head = models.separate_reward.value_head
        if head.in_features == hidden:
            models.critic_head.load_state_dict(head.state_dict())
        models.reward_source = RewardSource(False, rm_dir)
    models._collect_trainable()
    models.use(POLICY)
    return models.eval()
