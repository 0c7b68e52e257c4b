"""Multi-turn environments: what answers a model's tool call (`environment.tool`).

Each is a function `step(state: EpisodeState) -> Observation` (actors.common.episode) built once per
reward worker. A tool's failure - a program that raises, loops, floods its output, forks or reaches
for the network; an expression that does not parse - is an answer with `ok=False` the model sees,
never an exception; the worker's own time limit (`environment.timeout_s`) and error count cover a
plugin that hangs or raises (`RewardWorker.env_step`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from actors.common.env_config import CalculatorTool, EnvironmentConfig, PluginEnvironment, PythonTool
from actors.common.episode import EpisodeState, Observation, tool_call_arguments
from actors.reward.sandbox import SandboxLimits, check_sandbox, run_python
from actors.reward.verifiers import load_plugin

__all__ = ["Environment", "build_environment", "calculator", "python_tool"]

Environment = Callable[[EpisodeState], Observation]

_PYTHON_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_CALC = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
MAX_EXPRESSION = 200  # characters of one calculator expression


def _call(action: str, name: str, argument: str, blocks: re.Pattern[str]) -> str | None:
    """The turn's call: the `argument` of its last <tool_call> naming `name` (the chat template's format),
    else its last delimited block, else None."""
    args = tool_call_arguments(action, name)
    if args is not None:
        return str(args.get(argument, ""))
    found = blocks.findall(action)
    return str(found[-1]) if found else None


def python_tool(spec: PythonTool, wall_s: float) -> Environment:
    """The turn's last ```python block (or <tool_call> of "python" with its "code") runs in the sandbox;
    its output (stdout and stderr) is the answer. No call: the episode ends."""
    limits = SandboxLimits(
        wall_s=wall_s, cpu_s=spec.cpu_s, memory_mb=spec.memory_mb, max_processes=spec.max_processes,
        max_output_bytes=spec.max_output_bytes,
    )  # fmt: skip

    def step(state: EpisodeState) -> Observation:
        code = _call(state.actions[-1], "python", "code", _PYTHON_BLOCK)
        if code is None:
            return Observation("", done=True)
        result = run_python(code, limits)
        text = result.output.rstrip()
        if result.timed_out:
            return Observation(f"{text}\nTimeoutError: stopped after {wall_s:g} s".strip(), ok=False, timed_out=True)
        if result.output_exceeded:
            return Observation(f"{text}\n... output cut at {spec.max_output_bytes} bytes", ok=False)
        if result.exit_code != 0:
            return Observation(text or f"exit status {result.exit_code}", ok=False)
        return Observation(text)

    return step


def calculator(spec: CalculatorTool) -> Environment:
    """The turn's last <calc>expression</calc> (or <tool_call> of "calculator" with its "expression"),
    evaluated by simpleeval: numbers, + - * / // % ** and parentheses (no names, no functions; simpleeval
    bounds powers and lengths)."""
    from simpleeval import SimpleEval

    evaluator = SimpleEval(functions={}, names={})

    def step(state: EpisodeState) -> Observation:
        call = _call(state.actions[-1], "calculator", "expression", _CALC)
        if call is None:
            return Observation("", done=True)
        expression = call.strip()
        if len(expression) > MAX_EXPRESSION:
            return Observation(f"error: expression longer than {MAX_EXPRESSION} characters", ok=False)
        try:
            value = evaluator.eval(expression)
        except Exception as e:  # noqa: BLE001 - whatever the expression does wrong is the model's answer
            return Observation(f"error: {type(e).__name__}: {e}"[:300], ok=False)
        if not isinstance(value, int | float) or isinstance(value, bool):
            return Observation(f"error: not a number: {type(value).__name__}", ok=False)
        return Observation(f"{value:g}" if isinstance(value, float) else str(value))

    return step


def build_environment(cfg: EnvironmentConfig) -> Environment:
    match cfg.tool:
        case PythonTool():
            check_sandbox()  # a worker that cannot sandbox fails at start, naming why
            return python_tool(cfg.tool, cfg.timeout_s)
        case CalculatorTool():
            return calculator(cfg.tool)
        case PluginEnvironment():
            env: Environment = load_plugin(cfg.tool.function, "environment.tool.function")
            return env
    raise TypeError(f"environment.tool {cfg.tool!r} is not one of actors.common.env_config.Tool")
