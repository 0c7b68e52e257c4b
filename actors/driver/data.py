"""Prompts and reference answers: built-in verifiable tasks, JSONL and Parquet (verl-style).

`PromptSampler` walks the data set in a seeded order, epoch by epoch; its state (epoch, position)
goes into every checkpoint, so a resumed run sees the same prompts in the same order.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.common.arithmetic import draw, is_held_out
from actors.common.config import BuiltinData, DataConfig, JsonlData, ParquetData

__all__ = ["Example", "load_examples", "load_eval_examples", "PromptSampler", "render_prompt"]


@dataclass(frozen=True)
class Example:
    prompt: str | list[dict[str, str]]  # plain text or chat messages
    answer: str


def _arithmetic(cfg: BuiltinData) -> list[Example]:
    """'What is a + b?' / 'What is a - b?' with operands up to max_operand.

    With max_operand 10 SmolLM2-135M-Instruct answers about a fifth of its samples correctly at T = 1
    (0.09 with 20), inside the 0.05-0.6 band where GRPO has signal to learn from. With `held_out` a
    share of the distinct questions never reaches training (see `held_out_questions`).
    """
    rng = random.Random(cfg.seed)
    out: list[Example] = []
    while len(out) < cfg.num_samples:  # BuiltinData refuses a split that leaves no question to train on
        ex = _draw(rng, cfg)
        if not (cfg.held_out and is_held_out(str(ex.prompt), cfg.held_out)):
            out.append(ex)
    return out


def _draw(rng: random.Random, cfg: BuiltinData) -> Example:
    return Example(*draw(rng, cfg.task, cfg.max_operand))


def held_out_questions(cfg: BuiltinData, n: int) -> list[Example]:
    """Up to n distinct held-out questions, in a seeded order (seed + 1); fewer when the task has fewer
    (operands up to 10 and held_out 0.5: 88 of its 155 distinct questions)."""
    rng = random.Random(cfg.seed + 1)
    found: dict[str, Example] = {}
    for _ in range(200 * n):  # enough draws to meet every question of a small task
        ex = _draw(rng, cfg)
        if is_held_out(str(ex.prompt), cfg.held_out):
            found.setdefault(str(ex.prompt), ex)
            if len(found) == n:
                break
    return list(found.values())


def _dig(record: dict[str, Any], dotted: str) -> Any:
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _records_to_examples(records: list[dict[str, Any]], prompt_key: str, answer_key: str, where: str) -> list[Example]:
    out = []
    for i, rec in enumerate(records):
        try:
            prompt, answer = _dig(rec, prompt_key), _dig(rec, answer_key)
        except KeyError as e:
            raise ValueError(f"{where} record {i}: field {e.args[0]!r} is missing (keys: {sorted(rec)})") from None
        if hasattr(prompt, "tolist"):  # parquet list columns arrive as numpy arrays
            prompt = prompt.tolist()
        if isinstance(prompt, list):
            prompt = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
        elif not isinstance(prompt, str):
            raise ValueError(f"{where} record {i}: {prompt_key} must be a string or a list of chat messages")
        out.append(Example(prompt, str(answer)))
    if not out:
        raise ValueError(f"{where} holds no records")
    return out


def load_examples(cfg: DataConfig) -> list[Example]:
    src = cfg.source
    if isinstance(src, BuiltinData):
        return _arithmetic(src)
    path = Path(src.path).expanduser()
    if not path.is_file():
        raise ValueError(f"data.source.path={src.path!r} does not exist")
    if isinstance(src, JsonlData):
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{src.path}:{n}: not valid JSON ({e.msg})") from None
        return _records_to_examples(records, src.prompt_key, src.answer_key, src.path)
    assert isinstance(src, ParquetData)
    import pyarrow.parquet as pq

    return _records_to_examples(pq.read_table(path).to_pylist(), src.prompt_key, src.answer_key, src.path)


def load_eval_examples(cfg: DataConfig, n: int) -> list[Example]:
    """The held-out evaluation set (see DataConfig.eval_source)."""
    if cfg.eval_source is not None:
        return load_examples(cfg.model_copy(update={"source": cfg.eval_source}))[:n]
    if isinstance(cfg.source, BuiltinData) and cfg.source.held_out:
        return held_out_questions(cfg.source, n)
    if isinstance(cfg.source, BuiltinData):
        held_out = cfg.source.model_copy(update={"seed": cfg.source.seed + 1, "num_samples": n})
        return load_examples(cfg.model_copy(update={"source": held_out}))
    return load_examples(cfg)[:n]


def render_prompt(
    tokenizer: Any, example: Example, cfg: DataConfig, tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Token ids of the prompt, through the chat template when configured; tools: the schemas the
    template lists (a multi-turn environment in the template's tool format, actors.driver.tool_format)."""
    if not cfg.use_chat_template:
        text = example.prompt if isinstance(example.prompt, str) else "\n".join(m["content"] for m in example.prompt)
        return list(tokenizer(text)["input_ids"])
    messages = (
        [{"role": "user", "content": example.prompt}] if isinstance(example.prompt, str) else list(example.prompt)
    )
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    extra = {} if tools is None else {"tools": tools}
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


class PromptSampler:
    """Seeded epoch-wise order over the examples; `state()` / `load_state()` make it resumable."""

    def __init__(self, examples: list[Example], batch: int, seed: int, shuffle: bool = True) -> None:
        self.examples, self.batch, self.seed, self.shuffle = examples, batch, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next(self) -> list[Example]:
        return [self.draw() for _ in range(self.batch)]

    def draw(self) -> Example:
        """The next example of the order."""
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._make_order()
        self.pos += 1
        return self.examples[self._order[self.pos - 1]]

    @property
    def serial(self) -> int:
        """How many examples the order has given so far (the serial number of the next one)."""
        return self.epoch * len(self.examples) + self.pos

    def seek(self, serial: int) -> None:
        """Continue the order at `serial` (the same examples follow as after `serial` draws)."""
        self.load_state({"epoch": serial // len(self.examples), "pos": serial % len(self.examples)})

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._make_order()
