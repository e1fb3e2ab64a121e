"""rlhf_fast.train.ppo_math: hand-computed values, loop references on random masked inputs,
gradient checks of the losses, the adaptive KL controller's trajectory and state round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.train import ppo_math as pm

NAN = float("nan")


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), atol=atol, rtol=0
    )


def random_mask(batch, steps, generator, kind="gaps"):
    """Holes anywhere and some all-invalid rows ("gaps"), or right-padded rows."""
    if kind == "right_padded":
        lengths = torch.randint(0, steps + 1, (batch,), generator=generator)
        return torch.arange(steps)[None, :] < lengths[:, None]
    mask = torch.rand(batch, steps, generator=generator) > 0.3
    mask[::3] = False
    return mask


def poison(t, mask):
    """NaN wherever mask is false: a function that reads padding then fails the test."""
    return torch.where(mask, t, NAN)


# ---------------------------------------------------------------- hand-computed values


def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    # k1 = logp - ref
    close(pm.kl_k1(logp, ref), [0.5, -1.0])
    # log r = ref - logp = [-0.5, 1.0]; k3 = (r - 1) - log r
    close(pm.kl_k3(logp, ref), [(math.exp(-0.5) - 1) + 0.5, (math.e - 1) - 1.0])
    mask = torch.tensor([True, False])
    close(pm.per_token_kl(logp, torch.tensor([-1.5, NAN]), mask, "k3"), [math.exp(-0.5) - 0.5, 0])


def test_shaped_rewards_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]])  # a gap in row 1, row 2 empty
    kl = torch.tensor([[0.1, 0.2, NAN], [0.4, NAN, -0.3], [NAN, NAN, NAN]])
    scores = torch.tensor([3.0, -0.5, 5.0])
    ended = torch.tensor([True, False, True])
    out = pm.shaped_rewards(
        scores, kl, mask, kl_coef=0.5, score_clip=2.0, ended=ended, missing_eos_penalty=1.0
    )
    # non-score = -0.5 * kl on valid tokens
    close(out.non_score_rewards, [[-0.05, -0.1, 0], [-0.2, 0, 0.15], [0, 0, 0]])
    # row 0: 3.0 clipped to 2.0, ended, lands on index 1: -0.1 + 2.0
    # row 1: -0.5 inside the clip, no EOS: -0.5 - 1.0 = -1.5, lands on index 2: 0.15 - 1.5
    # row 2: no valid token, nothing lands
    close(out.rewards, [[-0.05, 1.9, 0], [-0.2, 0, -1.35], [0, 0, 0]])
    close(out.scores, [2.0, -1.5, 2.0])


def test_penalty_applies_after_clipping():
    out = pm.shaped_rewards(
        torch.tensor([-9.0]),
        torch.zeros(1, 2),
        torch.ones(1, 2, dtype=torch.bool),
        kl_coef=0.1,
        score_clip=1.0,
        ended=torch.tensor([False]),
        missing_eos_penalty=0.5,
    )
    close(out.rewards, [[0.0, -1.5]])  # clip(-9) = -1, then -0.5


def test_masked_statistics_by_hand():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # valid: 1, 2, 3, 4 -> mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    close(pm.masked_mean(values, mask), 2.5)
    close(pm.masked_mean(values, mask, dim=1), [1.5, 3.5])
    close(pm.masked_var(values, mask), 5 / 3)
    close(pm.masked_var(values, mask, unbiased=False), 5 / 4)
    std = math.sqrt(5 / 3)
    expected = [[-1.5 / std, -0.5 / std, 0], [0.5 / std, 1.5 / std, 0]]
    close(pm.masked_whiten(values, mask, eps=0.0), expected)
    # scale only: the mean 2.5 is added back on valid entries
    unshifted = [[-1.5 / std + 2.5, -0.5 / std + 2.5, 0], [0.5 / std + 2.5, 1.5 / std + 2.5, 0]]
    close(pm.masked_whiten(values, mask, shift_mean=False, eps=0.0), unshifted)


def test_empty_masks_give_zero_not_nan():
    values = torch.full((2, 3), NAN)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    close(pm.masked_mean(values, empty), 0.0)
    close(pm.masked_var(values, empty), 0.0)
    one = empty.clone()
    one[0, 1] = True
    close(pm.masked_var(values.nan_to_num(7.0), one), 0.0)  # n = 1: unbiased var undefined
    close(pm.masked_var(values.nan_to_num(7.0), one, unbiased=False), 0.0)
    close(pm.masked_whiten(values, empty), torch.zeros(2, 3))


def test_policy_loss_by_hand():
    # ratios exp(logp - old) = 1.5, 0.5, 1.1; the 4th token is padding
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), NAN]])
    old = torch.tensor([[0.0, 0.0, 0.0, NAN]])
    advantages = torch.tensor([[1.0, 1.0, -2.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = pm.policy_loss(logp, old, advantages, mask, clip_range=0.2)
    # token 0: max(-1 * 1.5, -1 * 1.2) = -1.2   (clipped taken)
    # token 1: max(-1 * 0.5, -1 * 0.8) = -0.5   (unclipped)
    # token 2: max(2 * 1.1, 2 * 1.1)   =  2.2   (equal: not counted as clipped)
    close(out.loss, (-1.2 - 0.5 + 2.2) / 3)
    close(out.clip_fraction, 1 / 3)
    # k3(old || new) with r = ratio: (r - 1) - log r
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    close(out.approx_kl, expected_kl)


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 1.0, NAN]])
    old_values = torch.tensor([[0.5, 2.0, 0.5, NAN]])
    returns = torch.tensor([[0.0, 3.0, 2.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = pm.value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: V_clip = 0.5 + 0.2 = 0.7; max((1 - 0)^2, (0.7 - 0)^2) = 1
    # token 1: V_clip = 2.0;             max(1, 1) = 1
    # token 2: V_clip = 0.7;             max((1 - 2)^2, (0.7 - 2)^2) = 1.69   (clipped)
    close(out.loss, 0.5 * (1 + 1 + 1.69) / 3)
    close(out.clip_fraction, 1 / 3)


def test_entropy_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0), -1e4, -1e4], [0.0, 0.0, 0.0, 0.0], [NAN] * 4]])
    mask = torch.tensor([[1, 1, 0]])
    # softmax [1/4, 3/4, 0, 0]: H = 1/4 ln 4 + 3/4 ln(4/3); uniform over 4: ln 4
    two_way = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)
    close(pm.entropy_from_logits(logits, mask), (two_way + math.log(4)) / 2, atol=1e-5)


def test_ptx_mix():
    close(pm.ppo_ptx_loss(torch.tensor(0.5), torch.tensor(2.0), ptx_coef=0.25), 0.5 + 0.25 * 2.0)
    with pytest.raises(ValueError, match="ptx_coef"):
        pm.ppo_ptx_loss(torch.tensor(0.5), torch.tensor(2.0), ptx_coef=-1.0)


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [1.0, 1.0]]])
    tokens = torch.tensor([[1, 0]])
    close(pm.token_logprobs(logits, tokens), [[math.log(0.75), math.log(0.5)]])
    # temperature 2 halves the logits: softmax [1, sqrt 3] / (1 + sqrt 3)
    close(
        pm.token_logprobs(logits, tokens, temperature=2.0),
        [[math.log(math.sqrt(3) / (1 + math.sqrt(3))), math.log(0.5)]],
    )


def test_token_logprobs_gradient_and_half_precision_logits():
    # The policy gradient flows through token_logprobs: the normaliser logsumexp is part of it
    # (detaching it would still give the right values, and a wrong gradient).
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    torch.autograd.gradcheck(lambda z: pm.token_logprobs(z, tokens), (logits,))
    torch.autograd.gradcheck(lambda z: pm.token_logprobs(z, tokens, 0.7), (logits,))
    # bf16 / fp16 logits: statistics in fp32, so the result is fp32 and as exact as the
    # logits' own rounding allows (bf16 arithmetic would be ~1e-2 off at a vocabulary of 4096)
    wide = 8 * torch.randn(3, 4, 4096, generator=g)
    tokens = torch.randint(0, 4096, (3, 4), generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        rounded = wide.to(dtype)
        out = pm.token_logprobs(rounded, tokens, temperature=0.9)
        assert out.dtype == torch.float32
        expected = pm.token_logprobs(rounded.double(), tokens, temperature=0.9)
        close(out, expected, atol=1e-4)


# ---------------------------------------------------------------- loop references


def loop_policy_loss(logp, old, adv, mask, eps):
    terms, clipped_count, kls = [], 0, []
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = math.exp(logp[b, t] - old[b, t])
            a = adv[b, t].item()
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            terms.append(max(unclipped, clipped))
            clipped_count += clipped > unclipped
            kls.append((ratio - 1) - math.log(ratio))
    n = max(len(terms), 1)
    return sum(terms) / n, clipped_count / n, sum(kls) / n


def loop_value_loss(values, old, returns, mask, eps):
    terms = []
    for b in range(values.shape[0]):
        for t in range(values.shape[1]):
            if mask[b, t]:
                v, o, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
                v_clip = o + min(max(v - o, -eps), eps)
                terms.append(max((v - r) ** 2, (v_clip - r) ** 2))
    return 0.5 * sum(terms) / max(len(terms), 1)


def loop_shaped_rewards(scores, kl, mask, kl_coef, clip, ended, penalty):
    rewards = torch.zeros(kl.shape, dtype=torch.float64)
    for b in range(kl.shape[0]):
        last = None
        for t in range(kl.shape[1]):
            if mask[b, t]:
                rewards[b, t] = -kl_coef * kl[b, t].item()
                last = t
        if last is not None:
            score = min(max(scores[b].item(), -clip), clip)
            rewards[b, last] += score - (0.0 if ended[b] else penalty)
    return rewards


def loop_whiten(values, mask):
    positions = torch.nonzero(mask).tolist()
    picked = [values[b, t].item() for b, t in positions]
    mean = sum(picked) / len(picked)
    var = sum((x - mean) ** 2 for x in picked) / (len(picked) - 1)
    out = torch.zeros(values.shape, dtype=torch.float64)
    for b, t in positions:
        out[b, t] = (values[b, t].item() - mean) / math.sqrt(var + 1e-8)
    return out


SHAPES = [(1, 1), (3, 7), (7, 13), (16, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["gaps", "right_padded"])
def test_losses_match_loops(shape, kind):
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        mask = random_mask(*shape, g, kind)
        logp = -torch.rand(shape, generator=g) * 3
        old = logp + 0.3 * torch.randn(shape, generator=g)
        adv = torch.randn(shape, generator=g)
        out = pm.policy_loss(poison(logp, mask), poison(old, mask), poison(adv, mask), mask, 0.2)
        loss, clip_fraction, approx_kl = loop_policy_loss(logp, old, adv, mask, 0.2)
        close(out.loss, loss, atol=1e-5)
        close(out.clip_fraction, clip_fraction)
        close(out.approx_kl, approx_kl, atol=1e-5)

        values, old_values = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        returns = 2 * torch.randn(shape, generator=g)
        vout = pm.value_loss(
            poison(values, mask), poison(old_values, mask), poison(returns, mask), mask, 0.3
        )
        close(vout.loss, loop_value_loss(values, old_values, returns, mask, 0.3), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["gaps", "right_padded"])
def test_rewards_and_whitening_match_loops(shape, kind):
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        mask = random_mask(*shape, g, kind)
        kl = torch.randn(shape, generator=g).abs()
        scores = 3 * torch.randn(shape[0], generator=g)
        ended = torch.rand(shape[0], generator=g) > 0.5
        out = pm.shaped_rewards(
            scores, poison(kl, mask), mask,
            kl_coef=0.05, score_clip=2.5, ended=ended, missing_eos_penalty=0.7,
        )  # fmt: skip
        expected = loop_shaped_rewards(scores, kl, mask, 0.05, 2.5, ended, 0.7)
        close(out.rewards, expected, atol=1e-5)

        values = torch.randn(shape, generator=g) * 4 + 1
        if mask.sum() >= 2:
            close(pm.masked_whiten(poison(values, mask), mask), loop_whiten(values, mask), 1e-4)


def test_advantages_and_returns_use_gae_then_whiten():
    g = torch.Generator().manual_seed(3)
    mask = random_mask(6, 11, g)
    rewards, values = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    advantages, returns = pm.advantages_and_returns(rewards, values, mask, gamma=0.99, lam=0.9)
    raw, expected_returns = ops.gae_reference(rewards, values, mask, gamma=0.99, lam=0.9)
    close(returns, expected_returns, atol=1e-5)
    close(advantages, loop_whiten(raw, mask), atol=1e-4)
    close(pm.masked_mean(advantages, mask), 0.0, atol=1e-5)
    close(pm.masked_var(advantages, mask), 1.0, atol=1e-4)


# ---------------------------------------------------------------- gradients


def test_gradchecks():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)

    def rand(scale=1.0):
        return (scale * torch.randn(3, 4, generator=g)).double()

    # Offsets of +-0.5 keep every ratio and value away from the clip boundaries, where the
    # loss has a kink that finite differences cannot see through.
    logp = rand().requires_grad_()
    old = (logp.detach() + 0.5 * torch.sign(rand())).requires_grad_(False)
    adv = rand()
    torch.autograd.gradcheck(lambda x: pm.policy_loss(x, old, adv, mask, 0.2).loss, (logp,))
    values = rand().requires_grad_()
    old_values = values.detach() + 0.5 * torch.sign(rand())
    returns = rand(2.0)
    torch.autograd.gradcheck(
        lambda v: pm.value_loss(v, old_values, returns, mask, 0.2).loss, (values,)
    )
    logits = torch.randn(3, 4, 5, generator=g).double().requires_grad_()
    torch.autograd.gradcheck(lambda z: pm.entropy_from_logits(z, mask), (logits,))
    torch.autograd.gradcheck(lambda x: pm.masked_whiten(x, mask), (rand().requires_grad_(),))


def test_clipped_tokens_get_no_gradient_and_padding_none():
    logp = torch.tensor([[math.log(1.5), math.log(0.9), 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, NAN]])
    advantages = torch.tensor([[1.0, 1.0, NAN]])
    mask = torch.tensor([[1, 1, 0]])
    pm.policy_loss(logp, old, advantages, mask, 0.2).loss.backward()
    # token 0 is clipped (ratio 1.5 > 1.2 with A > 0): no gradient; token 1: d(-A r / 2)/dlogp
    close(logp.grad, [[0.0, -0.9 / 2, 0.0]])

    values = torch.tensor([[1.0, 5.0]], requires_grad=True)
    pm.value_loss(values, torch.tensor([[0.5, NAN]]), torch.tensor([[2.0, NAN]]),
                  torch.tensor([[1, 0]]), 0.2).loss.backward()  # fmt: skip
    # clipped error taken (V_clip = 0.7 is constant in V): no gradient anywhere
    close(values.grad, [[0.0, 0.0]])


def test_whiten_adds_eps_to_the_variance_not_the_deviation():
    # (v - mean) * rsqrt(var + eps), as documented (and as trl computes it): at a spread
    # comparable to sqrt(eps) this differs from (v - mean) / (std + eps) by about 30%.
    values = torch.tensor([[0.0, 1e-4, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    var = 0.5e-8  # unbiased variance of {0, 1e-4}
    expected = [[-0.5e-4 / math.sqrt(var + 1e-8), 0.5e-4 / math.sqrt(var + 1e-8), 0.0]]
    close(pm.masked_whiten(values, mask), expected, atol=1e-6)


def test_whiten_nan_padding_reaches_neither_value_nor_gradient():
    # Whitening runs on rollout tensors whose padding may be NaN; if masked_whiten read it,
    # 0 * NaN in the backward of its mean and variance would poison every valid token's grad.
    values = torch.tensor([[1.0, NAN, 3.0], [NAN, 2.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    weights = torch.tensor([[1.0, 2.0, -1.0], [0.5, 3.0, 2.0]])
    (pm.masked_whiten(values, mask) * weights).sum().backward()
    assert torch.isfinite(values.grad).all(), values.grad
    close(values.grad[~mask], [0.0, 0.0])
    clean = torch.tensor([[1.0, 0.0, 3.0], [0.0, 2.0, 6.0]], requires_grad=True)
    (pm.masked_whiten(clean, mask) * weights).sum().backward()
    close(values.grad, clean.grad, atol=1e-6)


# ---------------------------------------------------------------- KL controllers


def test_adaptive_controller_trajectory_by_hand():
    controller = pm.AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    # n_steps / horizon = 1000 / 10000 = 0.1; coef *= 1 + 0.1 * clip(kl / 6 - 1, -0.2, 0.2)
    trajectory = [controller.update(kl, 1000) for kl in (9.0, 6.0, 4.5, 5.4)]
    # kl 9.0: error 0.5 -> 0.2, x1.02; kl 6.0: error 0, x1; kl 4.5: -0.25 -> -0.2, x0.98;
    # kl 5.4: error -0.1, x0.99
    expected = [0.2 * 1.02, 0.2 * 1.02, 0.2 * 1.02 * 0.98, 0.2 * 1.02 * 0.98 * 0.99]
    close(trajectory, expected, atol=1e-12)
    close(expected, [0.204, 0.204, 0.19992, 0.1979208], atol=1e-12)


def test_adaptive_controller_never_turns_the_penalty_into_a_bonus():
    # 1 + error * n / horizon with error >= -0.2 is <= 0 once n >= 5 * horizon: the coefficient
    # went negative (64 rows, horizon 10, KL under target: 0.1 -> -0.028), the KL "penalty"
    # rewarded drifting from the reference, and the next step raised a traceback
    controller = pm.AdaptiveKLController(0.1, target=1.0, horizon=10.0)
    with pytest.raises(ValueError, match="horizon 10.0 .* 64 rows"):
        controller.update(0.0, 64)
    assert controller.coef == 0.1  # left as it was
    assert controller.update(0.0, 49) == pytest.approx(0.1 * (1 - 0.2 * 4.9))  # still > 0


def test_fixed_controller_never_moves():
    controller = pm.FixedKLController(0.05)
    assert [controller.update(kl, 64) for kl in (0.0, 100.0)] == [0.05, 0.05]


def test_controller_state_round_trip_through_json():
    first = pm.AdaptiveKLController(0.1, target=2.0, horizon=500)
    first.update(3.0, 8)
    state = json.loads(json.dumps(first.state_dict()))
    second = pm.AdaptiveKLController(9.9, target=9.9, horizon=9.9)
    second.load_state_dict(state)
    assert second.state_dict() == first.state_dict()
    assert [second.update(k, 8) for k in (1.0, 2.5)] == [first.update(k, 8) for k in (1.0, 2.5)]

    fixed = pm.FixedKLController(0.3)
    restored = pm.FixedKLController(0.0)
    restored.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert restored.coef == 0.3
    with pytest.raises(ValueError, match="adaptive"):
        restored.load_state_dict(state)


# ---------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="old_logprobs"):
        pm.policy_loss(x, torch.zeros(2, 4), x, mask)
    with pytest.raises(TypeError, match="mask"):
        pm.masked_mean(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        pm.masked_mean(x, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="clip_range"):
        pm.value_loss(x, x, x, mask, clip_range=-0.1)
    with pytest.raises(ValueError, match="estimator"):
        pm.per_token_kl(x, x, mask, estimator="k2")
    with pytest.raises(ValueError, match="scores"):
        pm.shaped_rewards(torch.zeros(3), x, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        pm.shaped_rewards(torch.zeros(2), x, mask, kl_coef=float("nan"))
    with pytest.raises(ValueError, match="target"):
        pm.AdaptiveKLController(0.1, target=0.0, horizon=10)
    # the update multiplies the coefficient: from 0 it could never move, whatever the KL
    with pytest.raises(ValueError, match="init_coef must be > 0"):
        pm.AdaptiveKLController(0.0, target=6.0, horizon=10)
    with pytest.raises(ValueError, match="temperature"):
        pm.token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 0.0)
