"""What a job asks of the cluster, from its config: worked sums."""

from actors.common.config_load import load_config
from actors.common.demand import job_demand


def test_the_tiny_config_needs_three_cpus():
    d = job_demand(load_config("examples/tiny.yaml", []))
    # one engine x 1 CPU, two learners x 1 CPU, two reward workers x 0 (they sleep in the sandbox)
    assert (d.cpus, d.gpus, d.resources) == (3.0, 0.0, {"CPU": 3.0})
    assert d.describe() == "3 CPUs, 0 GPUs: rollout engines 1 x 1 CPU, learners 2 x 1 CPU, reward workers 2 x 0 CPU"


def test_gpus_and_custom_resources_add_up_over_the_pools():
    cfg = load_config(
        "examples/tiny.yaml",
        [
            "rollout.num_engines=2", "rollout.num_gpus_per_engine=0.5", "rollout.num_cpus_per_engine=4",
            "learner.num_learners=4", "learner.num_gpus_per_learner=1", "learner.num_cpus_per_learner=8",
            'learner.ray_resources={"forkrl_learner": 1}', 'reward.ray_resources={"forkrl_reward": 0.5}',
        ],
    )  # fmt: skip
    d = job_demand(cfg)
    # CPU 2 x 4 + 4 x 8 = 40; GPU 2 x 0.5 + 4 x 1 = 5; forkrl_learner 4 x 1; forkrl_reward 2 x 0.5
    assert d.resources == {"CPU": 40.0, "GPU": 5.0, "forkrl_learner": 4.0, "forkrl_reward": 1.0}
    assert "learners 4 x 8 CPU + 1 GPU + 1 forkrl_learner" in d.describe()
