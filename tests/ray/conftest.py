import pytest

from actors.common.config_load import load_config
from actors.common.models import resolve_model_path


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module (4 CPUs advertised: an engine, two learners, reward workers)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


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
