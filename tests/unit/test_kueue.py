"""Kueue admission's pure part (service/kueue.py): a job's RayJob from the chart's template, sized to its
demand, and the job state a RayJob's status says. Worked by hand."""

import copy

import pytest
import yaml

from actors.common.contract import JobState
from actors.common.demand import Demand, PoolDemand
from service.kueue import group_replicas, priority_class, state_of
from service.kueue import rayjob_manifest as typed_manifest
from service.rayjob_model import RayJob, WorkerGroup, quantity


def rayjob_manifest(template: dict, *args) -> dict:
    """The manifest the control plane sends, from a template as YAML gives it."""
    return typed_manifest(RayJob.model_validate(template), *args).dump()


def pod_resources(group: dict) -> dict[str, float]:
    return WorkerGroup.model_validate(group).pod_resources()


def _group(name: str, params: dict, resources: dict) -> dict:
    container = {"name": "ray-worker", "image": "forkrl", "resources": resources}
    spec = {"containers": [container]}
    return {"groupName": name, "replicas": 1, "rayStartParams": params, "template": {"spec": spec}}


TEMPLATE = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "template", "labels": {"app.kubernetes.io/name": "forkrl"}},
    "spec": {
        "entrypoint": "sleep 1",
        "rayClusterSpec": {
            "enableInTreeAutoscaling": True,
            "upgradeStrategy": {"type": "Recreate"},
            "autoscalerOptions": {"idleTimeoutSeconds": 60},
            "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [{"name": "ray-head"}]}}},
            "workerGroupSpecs": [
                _group("rollout", {}, {"requests": {"cpu": "2", "nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}}),
                _group("reward", {"num-cpus": "1"}, {"requests": {"cpu": "1"}}),
                _group("learner", {"num-cpus": "4"}, {"requests": {"cpu": "3500m"}}),
            ],
        },
    },
}


def test_quantities_and_what_a_pod_gives_ray():
    assert (quantity("500m"), quantity("2"), quantity(4), quantity("1.5")) == (0.5, 2.0, 4.0, 1.5)
    groups = TEMPLATE["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert pod_resources(groups[0]) == {"CPU": 2.0, "GPU": 1.0}  # the container's requests
    assert pod_resources(groups[2]) == {"CPU": 4.0, "GPU": 0.0}  # rayStartParams win over the request (3.5)
    limits_only = _group("x", {}, {"limits": {"cpu": "750m"}})
    assert pod_resources(limits_only) == {"CPU": 0.75, "GPU": 0.0}
    burst = _group("x", {}, {"requests": {"cpu": "1"}, "limits": {"cpu": "3"}})  # Ray is told the limit
    assert pod_resources(burst) == {"CPU": 3.0, "GPU": 0.0}


def test_each_pool_gets_the_pods_its_whole_actors_need():
    # 3 learners of 1.5 CPU on 4-CPU pods: two fit a pod (3 CPU), so 2 pods, not ceil(4.5 / 4) = 2 by luck:
    # 5 such learners need 3 pods where the CPU sum (7.5 of 8) would say 2
    assert group_replicas(PoolDemand(role="learners", count=3, cpus=1.5, gpus=0), {"CPU": 4, "GPU": 0}, "g") == 2
    assert group_replicas(PoolDemand(role="learners", count=5, cpus=1.5, gpus=0), {"CPU": 4, "GPU": 0}, "g") == 3
    # GPU-bound: 5 engines of 0.5 CPU + 1 GPU on 2-CPU, 4-GPU pods: min(4, 4) per pod -> 2 pods
    assert group_replicas(PoolDemand(role="e", count=5, cpus=0.5, gpus=1), {"CPU": 2, "GPU": 4}, "g") == 2
    # CPU-bound on the same pods with 1 CPU each: 2 per pod -> 3 pods
    assert group_replicas(PoolDemand(role="e", count=5, cpus=1, gpus=1), {"CPU": 2, "GPU": 4}, "g") == 3
    # reward workers ask for nothing: one pod holds them all; a pool of none gets no pod
    assert group_replicas(PoolDemand(role="r", count=4, cpus=0, gpus=0), {"CPU": 1, "GPU": 0}, "g") == 1
    assert group_replicas(PoolDemand(role="r", count=0, cpus=1, gpus=0), {"CPU": 1, "GPU": 0}, "g") == 0
    with pytest.raises(ValueError, match=r"learners needs 8 CPU .* group 'learner' gives 4 CPU"):
        group_replicas(PoolDemand(role="learners", count=1, cpus=8, gpus=0), {"CPU": 4, "GPU": 0}, "learner")


def test_a_job_gets_the_priority_class_at_or_below_its_priority():
    classes = {"low": -10, "normal": 0, "high": 100}
    assert [priority_class(p, classes) for p in (50, 100, 0, -10, -20)] == ["normal", "high", "normal", "low", ""]
    assert priority_class(5, {}) == ""


def test_the_rayjob_is_the_template_sized_to_the_job_and_suspended_in_its_queue():
    demand = Demand(pools=[
        PoolDemand(role="rollout engines", count=1, cpus=1, gpus=1),
        PoolDemand(role="learners", count=3, cpus=1.5, gpus=0),
        PoolDemand(role="reward workers", count=0, cpus=0, gpus=0),
    ])  # fmt: skip
    before = copy.deepcopy(TEMPLATE)
    env = {"FORKRL_JOB_CONFIG": '{"name": "x"}', "FORKRL_REPORT_TOKEN": "t"}
    m = rayjob_manifest(TEMPLATE, "forkrl-0011-r1", "python -m actors.train", env, demand, "team-a", "high")
    assert before == TEMPLATE  # the template is not changed
    assert m["metadata"] == {"name": "forkrl-0011-r1", "labels": {
        "app.kubernetes.io/name": "forkrl", "kueue.x-k8s.io/queue-name": "team-a",
        "kueue.x-k8s.io/priority-class": "high", "forkrl.io/job": "forkrl-0011-r1"}}  # fmt: skip
    spec = m["spec"]
    assert (spec["suspend"], spec["shutdownAfterJobFinishes"]) == (True, True)
    assert spec["entrypoint"] == "python -m actors.train"
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"env_vars": env}
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
    assert "upgradeStrategy" not in cluster  # KubeRay refuses it on a RayJob's cluster
    sizes = {g["groupName"]: (g["replicas"], g["minReplicas"], g["maxReplicas"]) for g in cluster["workerGroupSpecs"]}
    # rollout: 1 engine on a 2-CPU 1-GPU pod; learners: 3 x 1.5 CPU, two per 4-CPU pod; reward: none
    assert sizes == {"rollout": (1, 1, 1), "learner": (2, 2, 2), "reward": (0, 0, 0)}
    no_class = rayjob_manifest(TEMPLATE, "j", "e", env, demand, "team-a")
    assert "kueue.x-k8s.io/priority-class" not in no_class["metadata"]["labels"]


@pytest.mark.parametrize(
    "spec, status, state, says",
    [
        ({"suspend": True}, {}, JobState.QUEUED, "waiting for Kueue to admit it (LocalQueue team-a)"),
        ({"suspend": False}, {"jobDeploymentStatus": "Suspended"}, JobState.QUEUED, "LocalQueue team-a"),
        ({"suspend": False}, {}, JobState.PENDING, "its Ray cluster is starting (RayJob: New)"),
        ({"suspend": False}, {"jobDeploymentStatus": "Initializing"}, JobState.PENDING, "Initializing"),
        ({"suspend": False}, {"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}, JobState.PENDING, "Running"),
        ({"suspend": False}, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, JobState.RUNNING, ""),
        ({}, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, JobState.SUCCEEDED, ""),
        ({}, {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "message": "boom"}, JobState.FAILED, "boom"),
        ({}, {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, JobState.CANCELLED, ""),
        ({}, {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded", "message": "past 86400 s"},
         JobState.FAILED, "RayJob failed (DeadlineExceeded): past 86400 s"),
    ],
)  # fmt: skip
def test_the_job_state_a_rayjob_status_says(spec, status, state, says):
    obj = {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "team-a"}}, "spec": spec, "status": status}
    got, message = state_of(RayJob.model_validate(obj))
    assert got == state.value and says in message and (says or message == "")


def test_the_settings_refuse_two_preemptors_and_name_the_setting(tmp_path):
    from pydantic import ValidationError

    from service.settings import Settings

    refused = "preemption='lower_priority' with admission='kueue'.*FORKRL_PREEMPTION=off"
    with pytest.raises(ValidationError, match=refused):
        Settings(admission="kueue", preemption="lower_priority", data_dir=tmp_path)
    assert Settings(admission="kueue", data_dir=tmp_path).kueue_local_queue == "forkrl"
    with pytest.raises(ValidationError, match="kueue_local_queue"):
        Settings(admission="kueue", kueue_local_queue="", data_dir=tmp_path)


def test_a_pool_asking_for_a_resource_its_group_does_not_advertise_is_refused():
    template = copy.deepcopy(TEMPLATE)
    learner_group = template["spec"]["rayClusterSpec"]["workerGroupSpecs"][2]
    learner_group["rayStartParams"]["resources"] = "'{\"forkrl_learner\": 1000}'"  # as the chart renders it
    ok = Demand(pools=[PoolDemand(role="learners", count=2, cpus=1, gpus=0, resources={"forkrl_learner": 1})])
    groups = rayjob_manifest(template, "j", "e", {}, ok, "q")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert groups[2]["replicas"] == 1
    bad = Demand(pools=[PoolDemand(role="learners", count=2, cpus=1, gpus=0, resources={"forkrl_rollout": 1})])
    with pytest.raises(ValueError, match=r"learners ask for Ray resource\(s\) forkrl_rollout .* 'learner' does not "
                                         r"advertise \(forkrl_learner\)"):  # fmt: skip
        rayjob_manifest(template, "j", "e", {}, bad, "q")
