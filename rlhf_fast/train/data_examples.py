"""The examples the data readers return, and the one error they raise.

Each example keeps `source` ("FILE:LINE"), so that a problem found later (a chat template that
rejects the conversation) is still reported against the line it came from. `source` takes no
part in equality.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Messages = list[dict[str, str]]


class DataError(ValueError):
    """A bad data file, on one line: `FILE:LINE: what is wrong` (or `FILE: what is wrong` for a
    whole-file problem such as an empty file), plus how many more lines are bad, if any."""

    def __init__(self, location: str, reason: str, more_bad_lines: int = 0) -> None:
        self.location = location
        self.reason = reason
        self.more_bad_lines = more_bad_lines
        message = f"{location}: {reason}"
        if more_bad_lines:
            plural = "s" if more_bad_lines > 1 else ""
            message += f" ({more_bad_lines} more bad line{plural} after this one)"
        super().__init__(message)


@dataclass
class SFTExample:
    """A conversation (ends with a user turn) and the assistant's answer to learn."""

    messages: Messages
    response: str
    source: str = field(default="", compare=False, repr=False)


@dataclass
class RankExample:
    """A conversation and K >= 2 distinct answers, best first (pairwise: [chosen, rejected])."""

    messages: Messages
    responses: list[str]
    source: str = field(default="", compare=False, repr=False)


@dataclass
class ScoreExample:
    """A conversation, one answer and its finite score (the reward model's regression target)."""

    messages: Messages
    response: str
    score: float
    source: str = field(default="", compare=False, repr=False)


@dataclass
class PromptExample:
    """A conversation ending with a user turn, for the policy to answer (PPO)."""

    messages: Messages
    source: str = field(default="", compare=False, repr=False)
