"""The `environment` section of `JobConfig`: multi-turn, tool-using episodes (off by default).

An episode starts from a dataset row's prompt; the model writes a turn; a turn that ends on one of
the `stop` strings is a tool call, which the environment answers with an observation (rendered with
`observation_template`, tokenised once and appended); the model continues after it. The episode ends
when a turn ends otherwise (end of sequence: the model answered), when the environment says `done`,
after `max_turns` model turns, or when the episode's response would pass `max_tokens` (model and
observation tokens together). Only the model's tokens get a loss and count for the entropy filter.
`format` chooses how calls and answers are written: these delimiters, or the model's chat template's
tool format (actors.driver.tool_format).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from actors.common.config_base import StrictModel

__all__ = ["TOOL_SCHEMAS", "CalculatorTool", "EnvironmentConfig", "PluginEnvironment", "PythonTool", "Tool"]


class PythonTool(StrictModel):
    """The model's last fenced block (```python ... ```) of the turn runs in the code verifier's
    bubblewrap sandbox; its stdout and stderr come back (at most `max_output_bytes`)."""

    type: Literal["python"] = "python"
    cpu_s: float = Field(5, gt=0, le=600, description="CPU-time limit of one run (RLIMIT_CPU).")
    memory_mb: int = Field(512, ge=64, le=65536, description="Address-space limit of one run (RLIMIT_AS).")
    max_processes: int = Field(32, ge=1, le=4096, description="Processes and threads of one run (RLIMIT_NPROC).")
    max_output_bytes: int = Field(
        4096, ge=256, le=1 << 20, description="stdout+stderr kept; more stops the program (a tool error)."
    )


class CalculatorTool(StrictModel):
    """Arithmetic between <calc> and </calc> (simpleeval: numbers and operators, nothing else)."""

    type: Literal["calculator"] = "calculator"


class PluginEnvironment(StrictModel):
    type: Literal["plugin"] = "plugin"
    function: str = Field(
        ...,
        max_length=256,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="Import path module:function, called as f(state: EpisodeState) -> Observation "
        "(actors.common.episode). The control plane's tenancy policy decides which functions non-admin owners "
        "may name.",
    )


Tool = Annotated[PythonTool | CalculatorTool | PluginEnvironment, Field(discriminator="type")]

# each built-in tool's call delimiters: the stop string that ends a call, and how its answer is shown
TOOL_DEFAULTS: dict[str, tuple[list[str], str]] = {
    "python": (["```\n"], "```output\n{output}\n```\n"),
    "calculator": (["</calc>"], "<result>{output}</result>\n"),
    "plugin": (["</call>"], "<result>{output}</result>\n"),
}


def _schema(name: str, description: str, argument: str, what: str) -> dict[str, Any]:
    """A tool as a chat template's `tools=` lists it (JSON schema of its one string argument)."""
    parameters = {"type": "object", "properties": {argument: {"type": "string", "description": what}}}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": {**parameters, "required": [argument]}},
    }


# the built-in tools as the chat template's format offers them (environment.format chat_template)
TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    "python": _schema("python", "Run a Python program; its stdout and stderr come back.", "code", "The program."),
    "calculator": _schema(
        "calculator", "Evaluate arithmetic: numbers, + - * / // % ** and parentheses.", "expression", "The expression."
    ),
}


class EnvironmentConfig(StrictModel):
    tool: Tool = Field(default_factory=PythonTool)  # type: ignore[arg-type]
    format: Literal["auto", "chat_template", "delimiters"] = Field(
        "auto",
        description="How calls and answers are written. chat_template: the model's chat template's tool format "
        "(Hermes style: the prompt lists the tool, the model writes <tool_call>{...}</tool_call>, the answer is "
        "the template's tool message); delimiters: the tool's own markers (stop, observation_template); auto: "
        "chat_template when the template has a tool format and neither stop nor observation_template is set.",
    )
    max_turns: int = Field(4, ge=1, le=64, description="Most model turns of one episode.")
    max_tokens: int = Field(
        256, ge=2, le=131072, description="Most response tokens of one episode: model turns and observations."
    )
    max_observation_tokens: int = Field(
        64, ge=1, le=16384, description="An observation's tokens beyond this are cut (the end is dropped)."
    )
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None,
        max_length=8,
        description="Strings that end a model turn as a tool call (None: the tool's own; python: a closing "
        "``` fence and newline, calculator: </calc>).",
    )
    observation_template: str | None = Field(
        None,
        max_length=1024,
        description="How the tool's answer is shown to the model; must hold {output} (None: the tool's own).",
    )
    timeout_s: float = Field(10, gt=0, le=3600, description="Wall-clock limit of one environment step.")
    call_reward: float = Field(
        0.0, ge=-100, le=100, description="Reward added once per episode for a tool call that ran without error."
    )

    @model_validator(mode="after")
    def _template(self) -> EnvironmentConfig:
        if self.observation_template is not None and self.format == "chat_template":
            raise ValueError(
                f"environment.observation_template={self.observation_template!r} is for format 'delimiters': with "
                "format 'chat_template' the answer is the template's tool message; accepted: one of the two"
            )
        if self.observation_template is not None:
            if "{output}" not in self.observation_template:
                raise ValueError(
                    f"environment.observation_template={self.observation_template!r} must hold {{output}}, where "
                    "the tool's answer goes"
                )
            try:
                self.observation_template.format(output="")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"environment.observation_template={self.observation_template!r} is not a valid template: "
                    f"{e!r}; accepted: text with {{output}} (write {{{{ and }}}} for braces)"
                ) from None
        return self

    def stop_strings(self) -> list[str]:
        return self.stop if self.stop is not None else TOOL_DEFAULTS[self.tool.type][0]

    def template(self) -> str:
        return self.observation_template if self.observation_template is not None else TOOL_DEFAULTS[self.tool.type][1]
