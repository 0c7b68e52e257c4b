"""environment.format: the chat template's tool format (Hermes style) against the tool's delimiters.

A real tokenizer (the tiny model's, SmolLM2's vocabulary) and a real chat template rendered by
transformers: SmolLM2's own template has no tool format, so the Hermes-style one below (the shape of
Qwen2.5's: tools listed in a system turn, <tool_call> JSON, the answer as a user turn in
<tool_response>) is set on the tokenizer, with <tool_call> and </tool_call> added as tokens. The test
that counts: the prompt, the model's sampled ids and the answer's ids decode to exactly what the
template renders for the whole conversation - the turn change is the template's own text."""

from __future__ import annotations

import json

import pytest

from actors.common.batch import Completion
from actors.common.env_config import TOOL_SCHEMAS, EnvironmentConfig
from actors.common.episode import EpisodeState, Observation
from actors.common.models import resolve_model_path
from actors.driver.data import Example, render_prompt
from actors.driver.episodes import generate_groups
from actors.driver.runtime import load_tokenizer
from actors.driver.tool_format import has_tool_format, turn_format
from actors.reward.environments import calculator, python_tool

from .test_episodes import Calc, Scripted, _config

HERMES = (
    "{% if tools %}<|im_start|>system\nYou may call functions. Signatures within <tools></tools>:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\nReturn each call as <tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n{% endif %}'
    "{% for message in messages %}{% if message.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers():
    path = resolve_model_path("tiny-random-llama")
    plain = load_tokenizer(path)
    hermes = load_tokenizer(path)
    hermes.add_tokens(["<tool_call>", "</tool_call>"])
    hermes.chat_template = HERMES
    return plain, hermes


def _call(name: str, **arguments: str) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_auto_chooses_the_templates_tool_format_only_where_there_is_one(tokenizers):
    plain, hermes = tokenizers
    assert not has_tool_format(plain) and has_tool_format(hermes)
    env = EnvironmentConfig()
    assert not turn_format(env, plain).chat and turn_format(env, plain).stop == ["```\n"]
    fmt = turn_format(env, hermes)
    assert fmt.chat and fmt.stop == [] and fmt.tools == [TOOL_SCHEMAS["python"]]
    # delimiters set by hand keep the delimiters; asked of a template without a tool format: a clear error
    assert not turn_format(EnvironmentConfig(stop=["</code>"]), hermes).chat
    assert not turn_format(EnvironmentConfig(format="delimiters"), hermes).chat
    with pytest.raises(ValueError, match=r"environment.format='chat_template': the model's chat template has no"):
        turn_format(EnvironmentConfig(format="chat_template"), plain)
    with pytest.raises(ValueError, match=r"observation_template=.* is for format 'delimiters'"):
        EnvironmentConfig(format="chat_template", observation_template="<o>{output}</o>")


def test_a_chat_template_episode_is_the_templates_conversation_token_for_token(tokenizers):
    _, tok = tokenizers
    cfg = _config("environment.tool={type: calculator}", "environment.max_tokens=200",
                  "rollout.max_new_tokens=100")  # fmt: skip
    fmt = turn_format(cfg.environment, tok)
    prompt = render_prompt(tok, Example("What is 2+3?", "5"), cfg.data, fmt.tools)
    assert '"name": "calculator"' in tok.decode(prompt)  # the prompt lists the tool

    def turn(text: str) -> Completion:  # the model's turn as the engine returns it: its ids end on <|im_end|>
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        return Completion(ids, [-0.5] * len(ids), text, "stop")

    first, last = _call("calculator", expression="2+3"), "The answer is 5."
    engine = Scripted({0: [turn(first)], 1: [turn(last)]})
    (group,), counts = generate_groups(cfg, [Example("What is 2+3?", "5")], [prompt], 1, engine, Calc(), tok)
    (c,) = group
    assert counts["env/tool_calls"] == 1 and c.episode is not None and c.episode.turns == 2
    convo = [
        {"role": "system", "content": cfg.data.system_prompt},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": first},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": last},
    ]
    expected = tok.apply_chat_template(convo, tools=fmt.tools, tokenize=False)
    assert tok.decode(prompt + c.token_ids) + "\n" == expected  # (the template's "\n" after the last message)
    # the model's ids are the engine's, untouched; only the answer between them is the template's
    first_ids = engine.turns[0][0].token_ids
    assert c.token_ids[: len(first_ids)] == first_ids and c.token_ids[-len(engine.turns[1][0].token_ids) :] == (
        engine.turns[1][0].token_ids
    )
    answer = [t for t, m in zip(c.token_ids, c.model_mask or [], strict=True) if not m]
    turn_change = "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(answer) == turn_change  # the rest of the template's closing after <|im_end|>, the tool turn


def test_the_tools_read_a_tool_call_and_ignore_a_malformed_one():
    python = python_tool(EnvironmentConfig().tool, wall_s=5)  # type: ignore[arg-type]
    calc = calculator(EnvironmentConfig(tool={"type": "calculator"}).tool)  # type: ignore[arg-type]

    def state(action: str) -> EpisodeState:
        return EpisodeState("q", "5", [action], [])

    assert python(state(_call("python", code="print(2 + 3)"))) == Observation("5")
    two = "first " + _call("calculator", expression="1") + _call("calculator", expression="6*7")
    assert calc(state(two)).text == "42"  # the turn's last call
    for bad in ("<tool_call>{not json}</tool_call>", _call("other_tool", code="print(1)"), "no call at all"):
        assert python(state(bad)).done, bad  # not a call of this tool: the episode ends
    broken = python(state(_call("python", code="1/0")))
    assert not broken.ok and "ZeroDivisionError" in broken.text
