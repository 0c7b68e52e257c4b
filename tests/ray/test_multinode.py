"""Several Ray nodes on this box: `ray.cluster_utils.Cluster` starts a head and two worker nodes, each a
raylet of its own with its own resources (as the chart's worker groups are): the rollout engine on one,
the learners and the reward workers on another, nothing on the head. Weights cross nodes by the path a
real cluster uses (the engine asks the learner actor for the file's bytes; a node id of its own makes it
take that path although /dev/shm is one here). Minutes: marked slow."""

from __future__ import annotations

import math
import re

import pytest

from actors.common.pool import ActorPool
from actors.driver.loop import train

from .conftest import tiny_config
from .test_runtime import _every_metric_has_a_rule, _rows

pytestmark = pytest.mark.slow
# each pool on its worker group's resource, as the control plane sets them on Kubernetes (pool_resources)
POOLS_APART = (
    "rollout.ray_resources={forkrl_rollout: 1}",
    "learner.ray_resources={forkrl_learner: 1}",
    "reward.ray_resources={forkrl_reward: 1}",
)


@pytest.fixture(scope="module")
def nodes():
    """A head with no CPUs, a rollout node (1 CPU) and a learner node (3 CPUs, the reward workers too)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    rollout = cluster.add_node(num_cpus=1, resources={"forkrl_rollout": 1})
    learner = cluster.add_node(num_cpus=3, resources={"forkrl_learner": 2, "forkrl_reward": 2})
    ray.init(address=cluster.address)
    try:
        cluster.wait_for_nodes()
        yield {"rollout": rollout.unique_id, "learner": learner.unique_id}
    finally:
        ray.shutdown()
        cluster.shutdown()


class Idle:
    def ready(self) -> bool:
        return True


def test_a_learner_group_that_cannot_be_placed_fails_naming_what_it_needs_and_what_is_free(nodes):
    """Two learners of 2 CPUs each on the learner worker group (3 CPUs): the group never fits, so it fails
    within its bound naming the group, the free resources and the setting - no actor waits silently."""
    import ray

    before = ray.available_resources().get("CPU")
    with pytest.raises(TimeoutError) as e:
        ActorPool(Idle, 2, lambda i: (), num_cpus=2, resources={"forkrl_learner": 1}, name="Learner",
                  pack_within_s=3, pack_setting="learner start-up")  # fmt: skip
    assert re.fullmatch(
        r"2 x Learner \(2 CPU, 1 forkrl_learner each, placed together\) could not be placed within 3 s \(learner "
        r"start-up\): the Ray cluster has 4 CPU, 2 forkrl_learner, 2 forkrl_reward, 1 forkrl_rollout free of 4 CPU, "
        r"2 forkrl_learner, 2 forkrl_reward, 1 forkrl_rollout",
        str(e.value),
    ), str(e.value)
    assert ray.available_resources().get("CPU") == before  # the unplaced group was removed


def test_pools_on_three_nodes_train_sync_across_nodes_and_the_reward_rises(nodes, tmp_path):
    """The engine on one node, the two learners (one placement group) and the reward workers on another,
    nothing on the head: ten steps with weights crossing nodes (the engine asks the learner for the file's
    bytes, as on a real cluster) and the engine's log-probs matching the learner's; a dense toy reward a
    random model can learn rises."""
    cfg = tiny_config(
        tmp_path,
        *POOLS_APART,
        "trainer.steps=10",
        "trainer.save_every=0",
        "data.prompts_per_step=8",
        "rollout.group_size=8",
        "learner.micro_batch_size=16",
        "learner.lr=0.2",
        "algorithm.top_entropy_quantile=0.5",
    )
    summary = train(cfg)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 11))
    # a large learning rate on a tiny model: the rise dwarfs the batch noise (about 0.02)
    first = sum(r["reward/mean"] for r in rows[:2]) / 2
    last = sum(r["reward/mean"] for r in rows[-2:]) / 2
    assert last > first + 0.05, [round(r["reward/mean"], 3) for r in rows]
    learned = [r for r in rows if "entropy/kept_tokens" in r]  # steps whose groups were not all dropped
    assert len(learned) >= 3
    for r in learned:  # the filter keeps exactly ceil(rho N) tokens and logs its statistics
        assert r["entropy/kept_tokens"] == math.ceil(0.5 * r["entropy/num_valid"])  # mask sums over both ranks
        assert "timing/generate" in r and "timing/learn" in r and "timing/weight_sync" in r
    _every_metric_has_a_rule(rows)
    # every sync crossed nodes, and the engine sampled from the learner's weights at every step
    assert [r["weight_sync/remote_engines"] for r in learned] == [1.0] * len(learned)
    diffs = [r["rollout/logprob_abs_diff"] for r in learned]
    assert max(diffs) < 1e-3, diffs
    # the final export loads in transformers and in vLLM
    from transformers import AutoModelForCausalLM

    from actors.rollout.pool import RolloutPool

    assert AutoModelForCausalLM.from_pretrained(summary["export"]).num_parameters() > 0
    pool = RolloutPool(summary["export"], cfg.rollout, "float32", 0)
    try:
        assert len(pool.generate([[1, 2, 3]], 2)[0]) == 2
    finally:
        pool.shutdown()
