"""The chart with controlPlane.admission=kueue, rendered offline and validated like the rest: the RayJob
template against KubeRay's RayJob CRD (the newest and the oldest supported), Kueue's objects against
Kueue's CRDs (v0.16.0 and v0.19.2, tests/helm/crds/SOURCE.md), the rest against Kubernetes' schemas. The RayJob the
control plane makes from that template for a real job config is validated too. No cluster runs here."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from actors.common.config_load import load_config
from actors.common.demand import job_demand
from service.kueue import rayjob_manifest
from service.rayjob_model import RayJob

from .test_chart import CRD_SETS, MIN_KUBERAY, _restricted_violations, by_kind, chart, render, strict, validate

__all__ = ["chart"]  # the module fixture, shared

# Kueue's CRDs: the oldest release the README names (v1beta2 stored) and the newest here
CRD_DIR = Path(__file__).parent / "crds"
KUEUE_SETS = {
    tag: {p.stem: strict(json.loads(p.read_text())) for p in sorted((CRD_DIR / tag).glob("*.json"))}
    for tag in ("kueue-v0.16.0", "kueue-v0.19.2")
}
KUEUE = KUEUE_SETS["kueue-v0.19.2"]
VALUES = {
    "controlPlane": {"admission": "kueue"},
    "kueue": {"createQueues": True, "localQueue": "team-a", "priorityClasses": {"forkrl-low": -10, "forkrl-high": 100}},
}


def _template(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "demo-forkrl-rayjob"]
    return yaml.safe_load(cm["data"]["rayjob.yaml"])


def _validate_all(docs: list[dict[str, Any]], crds: str = "newest") -> None:
    for obj in docs:
        if obj["kind"] in KUEUE:
            assert obj["apiVersion"] == "kueue.x-k8s.io/v1beta2"
            for schemas in KUEUE_SETS.values():
                jsonschema.validate(obj, schemas[obj["kind"]])
        else:
            validate(obj, crds)


@pytest.mark.parametrize("crds", list(CRD_SETS))
def test_kueue_mode_renders_a_rayjob_template_rbac_and_queues_and_every_object_validates(chart, crds):
    docs = render(chart, VALUES)
    kinds = sorted(d["kind"] for d in docs)
    assert "RayCluster" not in kinds  # each job brings its own Ray cluster
    for kind in ("ConfigMap", "Role", "RoleBinding", "ResourceFlavor", "ClusterQueue", "LocalQueue"):
        assert kind in kinds, kinds
    _validate_all(docs, crds)
    template = _template(docs)
    jsonschema.validate(template, CRD_SETS[crds]["RayJob"])
    spec = template["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    groups = [g["groupName"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    assert groups == ["rollout", "reward", "learner"]
    (queue,) = by_kind(docs, "LocalQueue")
    (cq,) = by_kind(docs, "ClusterQueue")
    assert queue["metadata"] == {**queue["metadata"], "name": "team-a", "namespace": "ml"}
    assert queue["spec"] == {"clusterQueue": cq["metadata"]["name"]}
    (group,) = cq["spec"]["resourceGroups"]
    assert group["coveredResources"] == ["cpu", "memory", "nvidia.com/gpu"]
    assert {r["name"]: r["nominalQuota"] for r in group["flavors"][0]["resources"]} == {
        "cpu": "32", "memory": "128Gi", "nvidia.com/gpu": "0"}  # fmt: skip
    assert {p["metadata"]["name"]: p["value"] for p in by_kind(docs, "WorkloadPriorityClass")} == {
        "forkrl-low": -10, "forkrl-high": 100}  # fmt: skip
    # without createQueues: the admin's queues; the template and the rights only
    plain = render(chart, {**VALUES, "kueue": {**VALUES["kueue"], "createQueues": False}})
    assert not {"ResourceFlavor", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass"} & {d["kind"] for d in plain}


def test_the_control_plane_alone_gets_the_rights_and_the_token_to_create_rayjobs(chart):
    docs = render(chart, VALUES)
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["FORKRL_ADMISSION"] == "kueue" and env["FORKRL_KUEUE_LOCAL_QUEUE"] == "team-a"
    assert env["FORKRL_KUEUE_NAMESPACE"] == "ml" and env["FORKRL_KUEUE_RAYJOB_TEMPLATE"] == "/etc/forkrl/rayjob.yaml"
    assert json.loads(env["FORKRL_KUEUE_PRIORITY_CLASSES"]) == {"forkrl-low": -10, "forkrl-high": 100}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["rayjob-template"] == "/etc/forkrl"
    assert {"name": "rayjob-template", "configMap": {"name": "demo-forkrl-rayjob"}} in pod["volumes"]
    assert pod["automountServiceAccountToken"] is True
    (sa,) = by_kind(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False  # so no Ray pod (tenants' code) holds the token
    # every pod that runs tenants' code refuses the token itself, also when the service account is a shared
    # one the chart does not create (serviceAccount.create=false: the Role is bound to it)
    for values in (VALUES, {**VALUES, "serviceAccount": {"create": False, "name": "shared"}}):
        template = _template(render(chart, values))
        cluster = template["spec"]["rayClusterSpec"]
        workers = [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
        submitter = template["spec"]["submitterPodTemplate"]["spec"]
        for p in [cluster["headGroupSpec"]["template"]["spec"], *workers, submitter]:
            assert p["automountServiceAccountToken"] is False and p["serviceAccountName"] == (
                "shared" if values is not VALUES else "demo-forkrl")  # fmt: skip
    (role,) = by_kind(docs, "Role")
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
        {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["get", "list", "watch"]},
    ]
    (binding,) = by_kind(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "ml"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    # the standing-cluster mode has none of it
    default = render(chart)
    assert not by_kind(default, "Role") and "automountServiceAccountToken" not in (
        by_kind(default, "Deployment")[0]["spec"]["template"]["spec"])  # fmt: skip


def test_the_rayjob_made_for_a_job_validates_and_its_pods_pass_the_restricted_level(chart):
    """What service/kueue.py makes of the rendered template for the demo's job: a valid RayJob for
    KubeRay (newest and oldest supported), suspended in the queue, each group sized to the job."""
    template = _template(render(chart, VALUES))
    cfg = load_config("examples/demo.yaml", [])
    demand = job_demand(cfg)
    env = {"FORKRL_JOB_CONFIG": cfg.model_dump_json(), "FORKRL_REPORT_TOKEN": "x" * 43}
    made = rayjob_manifest(RayJob.model_validate(template), "forkrl-0123456789abcdef-r1", "python -m actors.train", env,
                           demand, "team-a", "forkrl-high")  # fmt: skip
    job = made.dump()
    for crds in CRD_SETS:
        jsonschema.validate(job, CRD_SETS[crds]["RayJob"])
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    sizes = {g["groupName"]: g["replicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    pools = {p.role: p for p in demand.pools}
    # the default pods have 2 CPUs: the demo's engines and learners fit as many per pod as 2 CPUs allow
    for group, role in (("rollout", "rollout engines"), ("learner", "learners")):
        pool = pools[role]
        per_pod = int(2 // pool.cpus) if pool.cpus else pool.count
        assert sizes[group] == -(-pool.count // per_pod), (group, pool)
    assert sizes["reward"] == (1 if pools["reward workers"].count else 0)
    cluster = job["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"],
            "submitter": job["spec"]["submitterPodTemplate"]["spec"],
            **{g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]}}  # fmt: skip
    for where, pod in pods.items():
        assert _restricted_violations(pod, where) == []


def test_kueue_objects_that_kueue_would_refuse_fail_validation(chart):
    docs = render(chart, VALUES)
    (cq,) = by_kind(docs, "ClusterQueue")
    bad = copy.deepcopy(cq)
    bad["spec"]["queueingStrategy"] = "Random"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, KUEUE["ClusterQueue"])
    (lq,) = by_kind(docs, "LocalQueue")
    bad = copy.deepcopy(lq)
    bad["spec"]["clusterQueues"] = ["x"]  # an unknown field
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, KUEUE["LocalQueue"])
    job = _template(docs)
    job["spec"]["suspend"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, CRD_SETS[MIN_KUBERAY]["RayJob"])


def test_in_kueue_mode_the_network_policies_cover_every_job_s_cluster_and_its_submitter(chart):
    docs = render(chart, VALUES)
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(docs, "NetworkPolicy")}
    cluster = _template(docs)["spec"]["rayClusterSpec"]
    ray_pods = policies["demo-forkrl-ray"]["podSelector"]["matchLabels"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert ray_pods.items() <= group["template"]["metadata"]["labels"].items()
    (rule,) = policies["demo-forkrl-ray-jobs-api"]["ingress"]
    components = [f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for f in rule["from"]]
    assert components == ["control-plane", "ray-job-submitter"]
    submitter = _template(docs)["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    assert rule["from"][1]["podSelector"]["matchLabels"].items() <= submitter.items()


@pytest.mark.parametrize(
    "values, where",
    [
        ({"controlPlane": {"admission": "kueues"}}, "admission"),
        ({"kueue": {"localQueue": "Team_A"}}, "localQueue"),
        ({"kueue": {"priorityClasses": {"high": "100"}}}, "priorityClasses"),
        ({"kueue": {"clusterQueue": {"quota": {"cpu": "lots"}}}}, "quota"),
        ({"kueue": {"clusterQueue": {"queueingStrategy": "LIFO"}}}, "queueingStrategy"),
        ({"kueue": {"createQueue": True}}, "createQueue"),
        ({"controlPlane": {"admission": "kueue", "preemption": "lower_priority"}}, "Kueue preempts"),
    ],
)
def test_the_values_schema_refuses_bad_kueue_values(chart, values, where):
    with pytest.raises(Exception) as e:
        render(chart, values)
    assert where in str(e.value)
