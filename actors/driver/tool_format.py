"""How a multi-turn episode's calls and answers are written (`environment.format`).

delimiters: the tool's own markers. A turn that ends on one of `environment.stop` (python: a closing
``` fence, calculator: </calc>) is a call; the answer comes back in `environment.observation_template`.

chat_template: the tokenizer's chat template's tool format, Hermes style (Qwen2.5, Qwen3, Hermes,
SmolLM3 and others): the prompt lists the tool (`tools=` of apply_chat_template), the model writes
<tool_call>{"name": ..., "arguments": {...}}</tool_call> and ends its message as the template taught it;
the answer comes back as the template's `tool` message followed by the assistant's generation prompt.
Those ids are the template's own text for the turn change, found once by rendering a conversation with
and without a tool message: what the template writes after an assistant message's content (less the
end-of-turn token the model already sampled), the tool message, the generation prompt. The model's
ids stay the engine's; only the answer is tokenised, once.

auto (the default): chat_template when the prompts go through the chat template, the template has a
tool format (it handles a `tool` role and the tokenizer knows <tool_call> as one token) and neither
`stop` nor `observation_template` is set; else delimiters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.common.batch import Completion
from actors.common.config import JobConfig
from actors.common.env_config import TOOL_SCHEMAS, EnvironmentConfig
from actors.common.episode import TOOL_CALL

__all__ = ["TurnFormat", "has_tool_format", "job_format", "prompt_tools", "turn_format"]

_AFTER, _OUTPUT = "\x00forkrl-assistant\x00", "\x00forkrl-output\x00"


def _render(tokenizer: Any, messages: list[dict[str, str]], **kw: Any) -> str:
    text: str = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    return text


def has_tool_format(tokenizer: Any) -> bool:
    """The tokenizer's chat template answers a `tool` role and its vocabulary holds <tool_call>."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "tool" not in template:
        return False
    ids = tokenizer.encode("<tool_call>", add_special_tokens=False)
    return len(ids) == 1  # one token: the model was trained on the format, not just able to spell it


@dataclass(frozen=True)
class TurnFormat:
    """stop: strings that end a turn; chat: the chat template's format; before/after: its text around a
    tool's output (chat); tools: the tool schemas the prompt lists (chat), else None."""

    env: EnvironmentConfig
    tokenizer: Any
    stop: list[str]
    chat: bool = False
    before: str = ""
    after: str = ""
    tools: list[dict[str, Any]] | None = None

    def is_call(self, c: Completion) -> bool:
        """Whether the model's turn is a tool call the environment answers."""
        if c.finish_reason != "stop":
            return False  # cut at the token cap: never a call
        if self.chat:
            return TOOL_CALL.search(c.text) is not None
        return any(c.text.endswith(s) for s in self.stop)

    def observation_ids(self, output: str, turn: list[int]) -> list[int]:
        """The answer as the model sees it (output cut at max_observation_tokens), tokenised once; turn:
        the model's last turn's ids (with the chat template, an end-of-turn token it sampled is not
        written again)."""
        tok, cap = self.tokenizer, self.env.max_observation_tokens
        out = tok.encode(output, add_special_tokens=False)
        if len(out) > cap:
            output = tok.decode(out[:cap]) + f"\n... ({len(out) - cap} more tokens cut)"
        if not self.chat:
            ids: list[int] = tok.encode(self.env.template().format(output=output), add_special_tokens=False)
            return ids
        before = self.before
        end = tok.decode(turn[-1:]) if turn else ""
        if end and before.startswith(end):
            before = before[len(end) :]
        ids = tok.encode(before + output + self.after, add_special_tokens=False)
        return ids


def turn_format(env: EnvironmentConfig, tokenizer: Any, templated: bool = True) -> TurnFormat:
    """The job's format (environment.format resolved against the tokenizer; templated: the prompts go
    through the chat template, data.use_chat_template); raises ValueError naming the field when
    chat_template is asked of a job or a template that cannot have it."""
    unset = env.stop is None and env.observation_template is None
    auto = env.format == "auto" and unset and templated
    chat = env.format == "chat_template" or (auto and has_tool_format(tokenizer))
    if not chat:
        return TurnFormat(env, tokenizer, env.stop_strings())
    if not templated:
        raise ValueError(
            "environment.format='chat_template' needs the prompts in the chat template: data.use_chat_template=false; "
            "accepted: data.use_chat_template=true, or format 'delimiters' (or 'auto')"
        )
    if not has_tool_format(tokenizer):
        raise ValueError(
            "environment.format='chat_template': the model's chat template has no tool format (no `tool` role, "
            "or no <tool_call> token); accepted: a Hermes-style template, or format 'delimiters' (or 'auto')"
        )
    convo = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": _AFTER}]
    base = _render(tokenizer, convo)
    full = _render(tokenizer, [*convo, {"role": "tool", "content": _OUTPUT}], add_generation_prompt=True)
    cut = base.index(_AFTER) + len(_AFTER)
    if not full.startswith(base[:cut]) or _OUTPUT not in full:
        raise ValueError("environment.format='chat_template': the template renders a tool message it cannot splice")
    before, after = full[cut:].split(_OUTPUT)
    schema = TOOL_SCHEMAS.get(env.tool.type)
    return TurnFormat(env, tokenizer, list(env.stop or []), True, before, after, None if schema is None else [schema])


def job_format(cfg: JobConfig, tokenizer: Any) -> TurnFormat | None:
    """The job's turn format (None: no environment)."""
    env = cfg.environment
    return None if env is None else turn_format(env, tokenizer, cfg.data.use_chat_template)


def prompt_tools(cfg: JobConfig, tokenizer: Any) -> list[dict[str, Any]] | None:
    """The tool schemas a job's prompts list (the chat template's format), else None."""
    fmt = job_format(cfg, tokenizer)
    return None if fmt is None else fmt.tools
