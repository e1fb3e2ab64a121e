"""The demo's task: tiny questions whose answers a program can judge.

Three kinds of question, each a comparison of two things by their value, whose one-token
answer is one of the two: a tiny model learns the order of numbers and letters from its
embeddings, so it also answers questions it never saw, and a tiny reward model can check an
answer the same way (answers that depend on positions in the question, such as "the last
letter of d a c f", it could not learn to check in a few hundred steps):

    Which is larger, 12 or 7?              -> 12
    Which is smaller, 12 or 7?             -> 7
    Which letter comes first, d or b?      -> b

The judge scores an answer in [0, 1] from three visible properties, weighted so that every
combination has its own score (8 distinct levels, which is what lets a ranking be strictly
ordered by the judge):

    correct    0.55   the final answer equals the right one
    formatted  0.30   the answer is exactly "The answer is X." (after the polite opening)
    polite     0.15   the answer opens with "Sure!"

The final answer is what follows the last lead-in phrase ("The answer is ", "It is ",
"I think "), or the whole reply when it has none, less one trailing period. So, asked which
is larger of 12 or 7, "Sure! The answer is 12." scores 1.0, "It is 12." 0.55, "12" 0.55 and
"Sure! The answer is 7." 0.45.

The data files imitate what a project would have: SFT answers that are decent but imperfect,
where the best habits are the rarer ones (right 85% of the time, formatted 25%, polite 35%:
imitating them scores ~0.6 on average, and the most likely answer is a right but plain one
that scores 0.55, which leaves PPO room to improve), K-wise rankings (K = 4..8) of answers
of varied quality ordered by the judge, and PPO / evaluation prompts drawn from questions
that the SFT and RM data never ask. Everything is a deterministic function of the seed.

The answers of one ranking differ only in what the judge scores: its wrong answers give the
same wrong answer and its unformatted answers share one wording. Measured on the demo's SFT
model (reward-model held-out pairwise accuracy, scratch runs; in brackets over the pairs
that differ in correctness alone or with other properties, the hard ones):

    wording and wrong answer drawn per answer, 800 rankings, 400 steps     0.78 (0.67)
    one wording per ranking, same data and steps                           0.85
    one wording per ranking, 2400 rankings (6000 SFT answers), 800 steps   0.86 (0.81)
    one wording and one wrong answer per ranking, as the last row          0.96 (0.93)

With a wording per answer the reward model learned format and politeness but little of
correctness: a third of the held-out pairs that differ only in correctness were ordered
wrongly, and "Sure! The answer is 37." and "Sure! The answer is o." to "Which is larger, 37
or 10?" scored the same, since a wording change explained as much of a ranking as the one
answer token that decides correctness. With two different wrong answers in a ranking, the
model ordered them by how wrong they looked (an answer from the question above a stray one),
which the judge does not score, and got 12% of the pairs that differ only in politeness
wrong. Wrong answers are still strays half the time across rankings (see wrong_answer).
"""

from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

CORRECT_WEIGHT, FORMAT_WEIGHT, POLITE_WEIGHT = 0.55, 0.30, 0.15
POLITE_OPENING = "Sure! "
LEAD_INS = ("The answer is ", "It is ", "I think ")
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# Shares of the SFT answers that have each property (drawn independently).
SFT_CORRECT, SFT_FORMATTED, SFT_POLITE = 0.85, 0.25, 0.35

_NUMBERS = re.compile(r"Which is (larger|smaller), (\d+) or (\d+)\?")
_LETTERS = re.compile(r"Which letter comes first, ([a-z]) or ([a-z])\?")
_FORMATTED = re.compile(r"(Sure! )?The answer is [^.]+\.")


# ---------------------------------------------------------------- questions


def make_question(rng: random.Random) -> str:
    """One question of a random kind."""
    kind = rng.randrange(3)
    if kind < 2:
        a, b = rng.sample(range(0, 40), 2)  # distinct, so there is an answer
        return f"Which is {'larger' if kind == 0 else 'smaller'}, {a} or {b}?"
    a, b = rng.sample(LETTERS, 2)
    return f"Which letter comes first, {a} or {b}?"


def solve(question: str) -> str:
    """The right answer to a question of the task; ValueError for any other text."""
    question = question.strip()
    if m := _NUMBERS.fullmatch(question):
        pick = max if m[1] == "larger" else min
        return str(pick(int(m[2]), int(m[3])))
    if m := _LETTERS.fullmatch(question):
        return min(m[1], m[2])
    raise ValueError(f"not a question of the demo task: {question!r}")


def split_of(question: str) -> str:
    """ "train" (SFT and RM data), "ppo" or "eval": fixed by the question's text alone (CRC32,
    stable across runs and machines), so that no split ever shares a question."""
    bucket = zlib.crc32(question.encode()) % 10
    return "eval" if bucket == 0 else "ppo" if bucket in (1, 2) else "train"


# ---------------------------------------------------------------- the judge


@dataclass(frozen=True)
class Verdict:
    correct: bool
    formatted: bool
    polite: bool

    @property
    def score(self) -> float:
        return (
            CORRECT_WEIGHT * self.correct
            + FORMAT_WEIGHT * self.formatted
            + POLITE_WEIGHT * self.polite
        )


def final_answer(response: str) -> str:
    """What follows the last lead-in phrase (or the whole reply), less one trailing period."""
    body = response.strip()
    if body.startswith(POLITE_OPENING.strip()):
        body = body[len(POLITE_OPENING.strip()) :].strip()
    cut = max((body.rfind(lead) + len(lead) for lead in LEAD_INS if lead in body), default=0)
    body = body[cut:].strip()
    return body[:-1].strip() if body.endswith(".") else body


def verdict(question: str, response: str) -> Verdict:
    body = response.strip()
    return Verdict(
        correct=final_answer(body) == solve(question),
        formatted=_FORMATTED.fullmatch(body) is not None,
        polite=body.startswith(POLITE_OPENING.strip()),
    )


def judge(question: str, response: str) -> float:
    """The score of `response` to `question`, in [0, 1] (see the module docstring)."""
    return verdict(question, response).score


# ---------------------------------------------------------------- answers


def wrong_answer(question: str, rng: random.Random) -> str:
    """Half the time the plausible mistake, the other one of the two; else a stray answer (any
    other number or letter). Without strays, a reward model never sees an answer outside the
    question and may score one highly: a letter question answered "38" is then what PPO finds."""
    right = solve(question)
    m = _NUMBERS.fullmatch(question) or _LETTERS.fullmatch(question)
    if rng.random() < 0.5:
        return next(x for x in m.groups()[-2:] if x != right)
    strays = [str(n) for n in range(40)] + list(LETTERS)
    return rng.choice([x for x in strays if x not in m.groups()])


# The wordings of an unformatted answer. Every wording puts a space before the answer, as the
# question does: a byte-level BPE spells "a" and " a" with different tokens, and the model
# should not have to learn both.
PLAIN_WORDINGS = ("It is {}.", "It is {}", "I think {}.", "I think {}")


def write_answer(
    question: str,
    rng: random.Random,
    *,
    correct: bool,
    formatted: bool,
    polite: bool,
    wording: str | None = None,
    wrong: str | None = None,
) -> str:
    """An answer with exactly the given properties; unformatted ones in `wording` (one of
    PLAIN_WORDINGS), wrong ones with the answer `wrong`; random ones when None."""
    answer = solve(question) if correct else wrong or wrong_answer(question, rng)
    if formatted:
        text = f"The answer is {answer}."
    else:
        text = (wording or rng.choice(PLAIN_WORDINGS)).format(answer)
    text = POLITE_OPENING + text if polite else text
    assert verdict(question, text) == Verdict(correct, formatted, polite), (question, text)
    return text


def sft_answer(question: str, rng: random.Random) -> str:
    return write_answer(
        question,
        rng,
        correct=rng.random() < SFT_CORRECT,
        formatted=rng.random() < SFT_FORMATTED,
        polite=rng.random() < SFT_POLITE,
    )


def ranking(question: str, rng: random.Random, k: int) -> list[str]:
    """k answers with distinct verdicts (so distinct scores), best first. The wrong ones give
    the same wrong answer and the unformatted ones share one wording, so two answers of a
    ranking differ only in what the judge scores."""
    verdicts = [
        Verdict(c, f, p) for c in (True, False) for f in (True, False) for p in (True, False)
    ]
    chosen = sorted(rng.sample(verdicts, k), key=lambda v: v.score, reverse=True)
    wording, wrong = rng.choice(PLAIN_WORDINGS), wrong_answer(question, rng)
    return [
        write_answer(question, rng, correct=v.correct, formatted=v.formatted, polite=v.polite,
                     wording=wording, wrong=wrong)
        for v in chosen
    ]  # fmt: skip


# ---------------------------------------------------------------- files


@dataclass(frozen=True)
class DemoSizes:
    # More distinct questions rather than more passes over few: the SFT model (and so the
    # reward model on it) then orders held-out numbers better (scratch: greedy correctness
    # 0.72 -> 0.79 with 2000 -> 6000 SFT answers, same steps).
    sft: int = 6000
    rm: int = 2400
    ppo_prompts: int = 512
    eval_prompts: int = 128


@dataclass(frozen=True)
class DemoData:
    sft: Path
    rm: Path
    prompts: Path
    eval_prompts: Path


def questions_of_split(split: str, count: int, rng: random.Random) -> list[str]:
    """`count` random questions of one split (repeats allowed, as in real data)."""
    questions: list[str] = []
    while len(questions) < count:
        question = make_question(rng)
        if split_of(question) == split:
            questions.append(question)
    return questions


def distinct_questions_of_split(split: str, count: int, rng: random.Random) -> list[str]:
    """`count` different questions of one split (evaluation: a repeat would weigh twice)."""
    questions: dict[str, None] = {}
    for _ in range(200 * count):
        if len(questions) == count:
            return list(questions)
        question = make_question(rng)
        if split_of(question) == split:
            questions[question] = None
    raise ValueError(f"the {split!r} split has fewer than {count} different questions")


def write_demo_data(
    directory: str | Path, seed: int = 0, sizes: DemoSizes = DemoSizes()
) -> DemoData:
    """Write sft.jsonl, rm.jsonl, prompts.jsonl and eval_prompts.jsonl (DESIGN.md formats)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sft = [
        {"prompt": q, "response": sft_answer(q, rng)}
        for q in questions_of_split("train", sizes.sft, rng)
    ]
    rm = [
        {"prompt": q, "responses": ranking(q, rng, rng.randint(4, 8))}
        for q in questions_of_split("train", sizes.rm, rng)
    ]
    prompts = [{"prompt": q} for q in questions_of_split("ppo", sizes.ppo_prompts, rng)]
    evaluation = [
        {"prompt": q} for q in distinct_questions_of_split("eval", sizes.eval_prompts, rng)
    ]
    names = ("sft.jsonl", "rm.jsonl", "prompts.jsonl", "eval_prompts.jsonl")
    data = DemoData(*(directory / name for name in names))
    for path, rows in zip(names, (sft, rm, prompts, evaluation), strict=True):
        with open(directory / path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return data


def task_texts(seed: int = 0) -> list[str]:
    """Text covering everything the task can say (questions and answers of every kind and
    wording), for training the demo's tokenizer."""
    rng = random.Random(seed)
    texts = []
    for _ in range(3000):
        question = make_question(rng)
        texts += [question, *ranking(question, rng, 3)]
    return texts
