import pytest

from actors.common.config_load import load_config
from actors.common.models import resolve_model_path


@pytest.fixture(scope="session")
def tiny_path() -> str:
    return resolve_model_path("tiny-random-llama")


def tiny_config(tmp_path, *overrides):
    return load_config(
        "examples/tiny.yaml",
        [
            f"trainer.output_dir={tmp_path}",
            'reward.verifiers=[{type: plugin, function: "tests.toy_rewards:lowercase_fraction"}]',
            *overrides,
        ],
    )
