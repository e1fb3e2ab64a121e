"""The demo task (rlhf_fast/demo/task.py) and its tokenizer and model (rlhf_fast/demo/model.py):
the judge on hand-checked answers, the data files in DESIGN.md's formats, rankings ordered by
the judge, determinism, and a model directory that plain transformers loads offline."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlhf_fast.demo import model as demo_model
from rlhf_fast.demo import task
from rlhf_fast.demo.task import Verdict, judge, solve, verdict

SMALL = task.DemoSizes(sft=120, rm=40, ppo_prompts=30, eval_prompts=20)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return task.write_demo_data(tmp_path_factory.mktemp("demo"), seed=3, sizes=SMALL)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- the judge


def test_solve():
    assert solve("Which is larger, 12 or 7?") == "12"
    assert solve("Which is larger, 2 or 29?") == "29"
    assert solve("Which is smaller, 12 or 7?") == "7"
    assert solve("Which letter comes first, d or b?") == "b"
    assert solve("Which letter comes first, b or d?") == "b"
    with pytest.raises(ValueError, match="not a question"):
        solve("Add 3 and 4.")


LARGER = "Which is larger, 12 or 7?"


@pytest.mark.parametrize(
    "question, response, expected",
    [
        # weights: correct 0.55, formatted 0.30, polite 0.15
        (LARGER, "Sure! The answer is 12.", 0.55 + 0.30 + 0.15),
        (LARGER, "The answer is 12.", 0.55 + 0.30),
        (LARGER, "Sure! The answer is 7.", 0.30 + 0.15),
        (LARGER, "It is 12.", 0.55),
        (LARGER, "12", 0.55),
        (LARGER, "Sure! I think 12.", 0.55 + 0.15),
        (LARGER, "Sure!", 0.15),
        (LARGER, "The answer is 112.", 0.30),  # 112 is not 12
        (LARGER, "The answer is 12", 0.55),  # no period: not the format
        (LARGER, "The answer is 12. The answer is 7.", 0.0),  # the last answer counts
        (LARGER, "sure! the answer is 12.", 0.0),  # case matters throughout
        (LARGER, "", 0.0),
        ("Which is smaller, 12 or 7?", "Sure! The answer is 7.", 1.0),
        ("Which is smaller, 12 or 7?", "Sure! The answer is 12.", 0.45),
        ("Which letter comes first, d or b?", "The answer is d b.", 0.30),
        ("Which letter comes first, d or b?", "It is b.", 0.55),
        ("Which letter comes first, d or b?", "I think d", 0.0),
    ],
)
def test_judge_hand_checked(question, response, expected):
    assert judge(question, response) == pytest.approx(expected)


def test_every_verdict_has_its_own_score():
    scores = [Verdict(c, f, p).score for c in (0, 1) for f in (0, 1) for p in (0, 1)]
    assert len(set(round(s, 9) for s in scores)) == 8
    assert min(scores) == 0 and max(scores) == pytest.approx(1.0)


def test_written_answers_have_the_asked_properties():
    rng = random.Random(0)
    for _ in range(300):
        question = task.make_question(rng)
        wanted = Verdict(rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.5)
        answer = task.write_answer(
            question, rng, correct=wanted.correct, formatted=wanted.formatted, polite=wanted.polite
        )
        assert verdict(question, answer) == wanted, (question, answer)


# ---------------------------------------------------------------- data files


def test_files_follow_design_formats(demo_data):
    sft, rm = read_jsonl(demo_data.sft), read_jsonl(demo_data.rm)
    prompts, evaluation = read_jsonl(demo_data.prompts), read_jsonl(demo_data.eval_prompts)
    assert (len(sft), len(rm), len(prompts), len(evaluation)) == (120, 40, 30, 20)
    assert all(set(row) == {"prompt", "response"} for row in sft)
    assert all(
        set(row) == {"prompt", "responses"} and 4 <= len(row["responses"]) <= 8 for row in rm
    )
    assert all(set(row) == {"prompt"} for row in prompts + evaluation)
    for row in sft + rm + prompts + evaluation:
        solve(row["prompt"])  # every prompt is a question of the task
    assert len({row["prompt"] for row in evaluation}) == len(evaluation)


def test_files_parse_with_the_trainer_readers(demo_data):
    from rlhf_fast.train import data

    assert len(data.read_sft(demo_data.sft)) == 120
    rankings = data.read_rm(demo_data.rm)
    assert len(rankings) == 40 and all(isinstance(r, data.RankExample) for r in rankings)
    assert len(data.read_prompts(demo_data.prompts)) == 30
    assert len(data.read_prompts(demo_data.eval_prompts)) == 20


def test_rankings_are_strictly_ordered_by_the_judge(demo_data):
    for row in read_jsonl(demo_data.rm):
        scores = [judge(row["prompt"], response) for response in row["responses"]]
        assert all(a > b for a, b in zip(scores, scores[1:], strict=False)), (row, scores)


def wording_of(question: str, response: str) -> str:
    """The response with its polite opening dropped and its final answer replaced by {}."""
    body = response.removeprefix(task.POLITE_OPENING)
    answer = task.final_answer(body)
    cut = body.rfind(answer)
    return body[:cut] + "{}" + body[cut + len(answer) :]


def test_ranked_answers_differ_only_in_what_the_judge_scores(demo_data):
    """The unformatted answers of one ranking share their wording and the wrong ones their
    wrong answer: a reward model cannot explain a preference by something the judge does not
    score (which wording, which wrong answer)."""
    wordings_seen, strays = set(), 0
    for row in read_jsonl(demo_data.rm):
        question, responses = row["prompt"], row["responses"]
        plain = [r for r in responses if not verdict(question, r).formatted]
        wordings = {wording_of(question, r) for r in plain}
        assert len(wordings) <= 1 and wordings <= set(task.PLAIN_WORDINGS), row
        wordings_seen |= wordings
        wrong = {task.final_answer(r) for r in responses if not verdict(question, r).correct}
        assert len(wrong) <= 1, row
        strays += bool(wrong - set(question.rstrip("?").replace(",", "").split()))
    assert wordings_seen == set(task.PLAIN_WORDINGS)  # but every wording occurs
    assert 0 < strays < len(read_jsonl(demo_data.rm))  # and wrong answers of both kinds


def test_splits_share_no_question(demo_data):
    train = {row["prompt"] for row in read_jsonl(demo_data.sft) + read_jsonl(demo_data.rm)}
    ppo = {row["prompt"] for row in read_jsonl(demo_data.prompts)}
    evaluation = {row["prompt"] for row in read_jsonl(demo_data.eval_prompts)}
    assert not (train & ppo) and not (train & evaluation) and not (ppo & evaluation)
    assert {task.split_of(q) for q in train} == {"train"}


def test_sft_answers_are_decent_but_imperfect():
    """The SFT data has room above it: imitating it scores well below the maximum of 1."""
    rng = random.Random(0)
    scores = [
        judge(q, task.sft_answer(q, rng)) for q in (task.make_question(rng) for _ in range(2000))
    ]
    # expected 0.85 * 0.55 + 0.25 * 0.30 + 0.35 * 0.15 = 0.595
    assert sum(scores) / len(scores) == pytest.approx(0.595, abs=0.03)


def test_same_seed_same_files_other_seed_other_files(tmp_path, demo_data):
    again = task.write_demo_data(tmp_path / "again", seed=3, sizes=SMALL)
    other = task.write_demo_data(tmp_path / "other", seed=4, sizes=SMALL)
    for name in ("sft", "rm", "prompts", "eval_prompts"):
        assert getattr(again, name).read_bytes() == getattr(demo_data, name).read_bytes()
        assert getattr(other, name).read_bytes() != getattr(demo_data, name).read_bytes()


# ---------------------------------------------------------------- tokenizer and model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = demo_model.DemoModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    directory = tmp_path_factory.mktemp("demo_model")
    return demo_model.build_model_dir(directory, task.task_texts(0), config)


def test_tokenizer_round_trips_the_task_text(model_dir, demo_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    texts = [row["prompt"] for row in read_jsonl(demo_data.sft)]
    texts += [r for row in read_jsonl(demo_data.rm) for r in row["responses"]]
    texts += ["Café 東京 🙂 text the task never says"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # The task's own text compresses: well under one token per character.
    ids = tokenizer("Sure! The answer is 17.", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 8


def test_chat_template_and_special_tokens(model_dir):
    from transformers import AutoTokenizer

    from rlhf_fast.models.prompt_format import prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert len({tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}) == 3
    ids = prompt_token_ids(tokenizer, [{"role": "user", "content": "Which is smaller, 3 or 4?"}])
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["<bos>", "<|user|>"] and tokens[-1] == "<|assistant|>"
    history = [
        {"role": "user", "content": "Which is smaller, 3 or 4?"},
        {"role": "assistant", "content": "The answer is 3."},
        {"role": "user", "content": "Which is larger, 5 or 1?"},
    ]
    text = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<bos><|user|>Which is smaller, 3 or 4?<|assistant|>The answer is 3.<eos>"
        "<|user|>Which is larger, 5 or 1?<|assistant|>"
    )


def test_model_dir_loads_with_plain_transformers_offline(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("*.pt"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer("Which is smaller, 3 or 4?")["input_ids"]])
    out = model.generate(
        ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert out.shape[1] <= ids.shape[1] + 3


def test_default_model_is_tiny():
    tokenizer = demo_model.build_tokenizer(task.task_texts(0))
    model = demo_model.build_model(tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    assert 0.85e6 < parameters < 0.95e6, parameters  # "about 0.9M" (DemoModelConfig)
    assert len(tokenizer) < demo_model.DemoModelConfig().vocab_size  # the bound is not reached


def test_judge_policy_reports_the_judges_scores(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_fast.demo.evaluate import judge_policy

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    questions = [task.make_question(random.Random(i)) for i in range(10)]
    report = judge_policy(model, tokenizer, questions, max_new_tokens=6, batch_size=4, show=10)
    assert [q for q, _, _ in report.samples] == questions
    scores = [judge(q, a) for q, a, _ in report.samples]
    assert [s for _, _, s in report.samples] == scores
    assert report.score == pytest.approx(sum(scores) / len(scores))
    assert 0 <= report.ended <= 1 and 1 <= report.mean_length <= 6
    # seeded: the same call gives the same answers
    assert judge_policy(model, tokenizer, questions, max_new_tokens=6, batch_size=4,
                        show=10).samples == report.samples  # fmt: skip
    # greedy answers do not depend on how questions are batched (left padding is invisible)
    greedy = [
        judge_policy(model, tokenizer, questions, temperature=0.0, max_new_tokens=6,
                     batch_size=size, show=10).samples
        for size in (3, 10)
    ]  # fmt: skip
    assert greedy[0] == greedy[1]


def test_judged_answers_stop_where_chat_stops_them(model_dir, monkeypatch):
    """The judge scored answers generated to the tokenizer's EOS only, while chat (and PPO's
    rollouts) also stop at the ids the model's generation_config lists."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_fast.demo import evaluate

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    seen, generate = [], evaluate.generate_rollouts
    monkeypatch.setattr(
        evaluate,
        "generate_rollouts",
        lambda *a, **k: seen.append(k["eos_token_ids"]) or generate(*a, **k),
    )
    evaluate.judge_policy(
        model, tokenizer, [task.make_question(random.Random(0))], max_new_tokens=2
    )
    assert seen == [sorted({tokenizer.eos_token_id, 7})]


@pytest.mark.parametrize("scale", [0.01, 1, 3, 10])
def test_every_allowed_demo_scale_has_enough_evaluation_questions(scale):
    """RLHF_FAST_DEMO_SCALE allows (0, 10]; the 'eval' split holds only 369 distinct questions,
    so scaling the evaluation file with the rest failed from scale 2.9 on."""
    from rlhf_fast.demo.pipeline import DemoPreset

    preset = DemoPreset().scaled(scale)
    questions = task.distinct_questions_of_split(
        "eval", preset.sizes.eval_prompts, random.Random(0)
    )
    assert len(set(questions)) == preset.sizes.eval_prompts >= preset.eval_questions >= 16
