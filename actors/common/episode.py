"""What crosses between the driver's turn loop and an environment, and what an episode leaves behind.

    driver  -> EpisodeState   the row and the turns so far; the environment answers the last action
    environment -> Observation   the tool's answer, an optional reward term, done
    driver  -> Episode        an episode's counts, carried by its `Completion` (actors.common.batch)

An environment is a function `step(state: EpisodeState) -> Observation`: it holds no state of its
own between turns (each call sees the whole episode), so any worker may answer any turn and a
replaced worker loses nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["TOOL_CALL", "Episode", "EpisodeState", "Observation", "tool_call_arguments"]

# a chat template's tool call, Hermes style (environment.format chat_template)
TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def tool_call_arguments(action: str, name: str) -> dict[str, Any] | None:
    """The arguments of the turn's last <tool_call> naming `name`, or None (no such call, or not JSON
    with a name and an arguments object)."""
    for raw in reversed(TOOL_CALL.findall(action)):
        try:
            call = json.loads(raw)
        except ValueError:
            continue
        if isinstance(call, dict) and call.get("name") == name and isinstance(call.get("arguments"), dict):
            args: dict[str, Any] = call["arguments"]
            return args
    return None


@dataclass(frozen=True)
class Observation:
    """text: the tool's answer (shown through environment.observation_template); reward: a term added
    to the episode's reward; done: end the episode here; ok: the call ran without error (a tool's
    failure is an answer, never an exception); timed_out: it hit its time limit."""

    text: str
    reward: float = 0.0
    done: bool = False
    ok: bool = True
    timed_out: bool = False


@dataclass(frozen=True)
class EpisodeState:
    """prompt and answer: the dataset row; actions: the model's turns as text, the last one the turn to
    answer; observations: the answers to the earlier ones (len(actions) - 1 of them)."""

    prompt: Any
    answer: str
    actions: list[str]
    observations: list[Observation]


@dataclass(frozen=True)
class Episode:
    """The counts of one finished episode. truncated: ended by max_turns or max_tokens, not by the model
    or the environment; reward: the observations' reward terms (and environment.call_reward) summed."""

    turns: int
    tool_calls: int
    tool_errors: int
    tool_timeouts: int
    observation_tokens: int
    reward: float
    truncated: bool
