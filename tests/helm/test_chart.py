"""The Helm chart, rendered offline by Helm's own Go SDK (helm-python-sdk) and validated against
Kubernetes' schemas (kubernetes-validate) and KubeRay's CRDs. No cluster runs here."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import helm_python as helm  # a dev dependency (make setup installs it): missing, these tests must fail
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "forkrl"
CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
KUBE_VERSION = "1.30.0"
OVERLAYS = sorted((CHART / "examples").glob("*.yaml"))


def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as the API server does under kubectl's default
    `--validate=strict` (a plain JSON-schema check would let them through): every object schema with
    declared properties gets additionalProperties: false, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_schema(file: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / file).read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(v1["schema"]["openAPIV3Schema"])


def _vendored(tag: str) -> dict[str, dict[str, Any]]:
    """A release's schemas kept in tests/helm/crds (see SOURCE.md there), refusing unknown fields."""
    folder = Path(__file__).parent / "crds" / tag
    return {p.stem: strict(json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))}


CRD_SCHEMAS = {"RayCluster": _crd_schema("ray.io_rayclusters.yaml"), "RayJob": _crd_schema("ray.io_rayjobs.yaml")}
# the newest KubeRay, and the oldest release the chart says it needs (Chart.yaml, README)
MIN_KUBERAY = "v1.6.0"
CRD_SETS = {"newest": CRD_SCHEMAS, MIN_KUBERAY: _vendored(MIN_KUBERAY)}


@pytest.fixture(scope="module")
def chart():
    c = helm.Chart.load(str(CHART))
    yield c
    c.close()


def render(chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = chart.render(values or {}, name="demo", namespace="ml")
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


KUEUE_SCHEMAS = _vendored("kueue-v0.19.2")  # Kueue's objects (kueue.createQueues); both releases: test_kueue


def validate(obj: dict[str, Any], crds: str = "newest") -> None:
    kind = obj["kind"]
    if kind in CRD_SCHEMAS:
        jsonschema.validate(obj, CRD_SETS[crds][kind])
    elif kind in KUEUE_SCHEMAS:
        jsonschema.validate(obj, KUEUE_SCHEMAS[kind])
    else:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_lint_reports_no_errors():
    report = helm.lint(str(CHART), strict=False)
    errors = [m for m in report["messages"] if m["severity"] >= 3] + report["errors"]
    assert errors == [], errors


@pytest.mark.parametrize("crds", list(CRD_SETS))
@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=lambda p: p.stem if p else "defaults")
def test_every_object_validates(chart, overlay, crds):
    values = yaml.safe_load(overlay.read_text()) if overlay else {}
    docs = render(chart, values)
    kinds = {d["kind"] for d in docs}
    # a standing RayCluster, or with Kueue a RayJob template per job (tests/helm/test_kueue.py)
    ray = "ConfigMap" if values.get("controlPlane", {}).get("admission") == "kueue" else "RayCluster"
    assert {"Deployment", "Service", "ServiceAccount", ray, "Pod"} <= kinds, kinds
    for obj in docs:
        validate(obj, crds)


def test_the_stated_minimum_kuberay_is_the_oldest_whose_crds_take_the_chart(chart):
    # every optional part on: autoscaling, GCS fault tolerance (KubeRay 1.3), the upgrade strategy (1.6)
    values = {"ray": {"autoscaling": {"enabled": True},
                      "gcsFaultTolerance": {"enabled": True, "redisAddress": "redis:6379"}}}  # fmt: skip
    (cluster,) = by_kind(render(chart, values), "RayCluster")
    jsonschema.validate(cluster, CRD_SETS[MIN_KUBERAY]["RayCluster"])
    assert cluster["spec"]["upgradeStrategy"] == {"type": "Recreate"}
    # the release before it refuses the upgrade strategy, and only that
    older = _vendored("v1.5.2")["RayCluster"]
    errors = list(jsonschema.Draft7Validator(older).iter_errors(cluster))
    assert errors and all("upgradeStrategy" in str(e.message) for e in errors), [e.message for e in errors]
    without = copy.deepcopy(cluster)
    del without["spec"]["upgradeStrategy"]
    jsonschema.validate(without, older)
    # what the chart and the README tell operators
    chart_yaml = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert "KubeRay operator >= 1.6" in chart_yaml["annotations"]["forkrl.io/requires"]
    assert "KubeRay operator (>= 1.6" in (ROOT / "README.md").read_text()


def test_a_broken_manifest_fails_validation(chart):
    # the validators must be able to say no: a Deployment with a string replica count, a RayCluster
    # worker group without its required template
    (dep,) = by_kind(render(chart), "Deployment")
    bad = copy.deepcopy(dep)
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    (rc,) = by_kind(render(chart), "RayCluster")
    del rc["spec"]["workerGroupSpecs"][0]["template"]
    with pytest.raises(jsonschema.ValidationError):
        validate(rc)


@pytest.mark.parametrize(
    "values, where",
    [
        ({"controlPlane": {"replicas": "2"}}, "replicas"),  # wrong type
        ({"learners": {"replicas": 1, "resources": {}, "gpus": 8}}, "gpus"),  # unknown key
        ({"controlPlane": {"replicas": 1, "resources": {}, "colour": "red"}}, "colour"),
        ({"bogus": True}, "bogus"),
        ({"controlPlane": {"replicas": 2, "resources": {}}}, "replicas"),  # SQLite allows one replica
        ({"database": {"type": "mysql"}}, "type"),
        ({"rayHead": {"replicas": 2}}, "replicas"),
        ({"rolloutWorkers": {"replicas": 1, "resources": {"limits": {"nvidia.com/gpu": "many"}}}}, "nvidia.com~1gpu"),
        ({"ray": {"gcsFaultTolerance": {"enabled": True}}}, "redisAddress"),
        ({"controlPlane": {"tenancy": {"mode": "open"}}}, "mode"),
        ({"controlPlane": {"tenancy": {"allowedPlugins": ["os.system"]}}}, "allowedPlugins"),
        ({"controlPlane": {"tenancy": {"dataRoots": ["relative/dir"]}}}, "dataRoots"),
        ({"controlPlane": {"tenancy": {"limits": {"maxJobsPerOwnr": 5}}}}, "maxJobsPerOwnr"),
        ({"controlPlane": {"tenancy": {"limits": {"allowedRayResources": {"reward": ["node:*"]}}}}}, "reward/0"),
        ({"ray": {"auth": {"enabled": "yes"}}}, "enabled"),
        ({"controlPlane": {"admission": "fifo"}}, "admission"),
        ({"controlPlane": {"preemption": "always"}}, "preemption"),
    ],
)
def test_schema_rejects_bad_values(chart, values, where):
    with pytest.raises(helm.HelmError) as err:
        chart.render(values, name="demo", namespace="ml")
    assert where in str(err.value), str(err.value)


def test_postgresql_allows_several_replicas_and_reads_the_url_from_a_secret(chart):
    docs = render(
        chart,
        {"controlPlane": {"replicas": 3, "resources": {}}, "database": {"type": "postgresql"}},
    )
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["replicas"] == 3
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FORKRL_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "forkrl-db", "key": "url"}
    (runs,) = by_kind(docs, "PersistentVolumeClaim")  # the runs' claim only: no SQLite volume
    assert runs["metadata"]["name"] == "demo-forkrl-runs"


def test_key_values_reach_the_manifests(chart):
    values = {
        "image": {"repository": "registry.local/forkrl", "tag": "9.9.9-gpu"},
        "controlPlane": {"replicas": 1, "resources": {}, "env": [{"name": "FORKRL_LOG_LEVEL", "value": "debug"}]},
        "rolloutWorkers": {
            "replicas": 3,
            "maxReplicas": 5,
            "resources": {"limits": {"nvidia.com/gpu": 4, "cpu": "16"}},
            "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "WARN"}],
            "nodeSelector": {"pool": "rollout"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "learners": {"replicas": 2, "resources": {"limits": {"nvidia.com/gpu": 8}}},
    }
    docs = render(chart, values)
    (dep,) = by_kind(docs, "Deployment")
    (rc,) = by_kind(docs, "RayCluster")
    cp = dep["spec"]["template"]["spec"]["containers"][0]
    assert cp["image"] == "registry.local/forkrl:9.9.9-gpu"
    assert {"name": "FORKRL_LOG_LEVEL", "value": "debug"} in cp["env"]
    env = {e["name"]: e.get("value") for e in cp["env"]}
    assert env["FORKRL_RAY_ADDRESS"] == "http://demo-forkrl-ray-head-svc.ml.svc:8265"  # the chart's own head
    assert env["FORKRL_POOL_RESOURCES"] == "true"  # whose groups the pools land on by default
    assert cp["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert cp["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert (
        rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/forkrl:9.9.9-gpu"
    )
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"rollout", "reward", "learner"}
    rollout = groups["rollout"]
    assert (rollout["replicas"], rollout["maxReplicas"]) == (3, 5)
    pod = rollout["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert {"name": "VLLM_LOGGING_LEVEL", "value": "WARN"} in pod["containers"][0]["env"]
    assert pod["nodeSelector"] == {"pool": "rollout"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert groups["learner"]["replicas"] == 2
    assert groups["learner"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    # each pool advertises the Ray resource its actors can ask for
    assert json.loads(rollout["rayStartParams"]["resources"].strip("'")) == {"forkrl_rollout": 1000}
    assert "forkrl_learner" in groups["learner"]["rayStartParams"]["resources"]


def test_external_ray_cluster_and_gcs_fault_tolerance(chart):
    docs = render(
        chart,
        {
            "controlPlane": {"replicas": 1, "resources": {}, "rayAddress": "http://ray.elsewhere:8265"},
            "ray": {"gcsFaultTolerance": {"enabled": True, "redisAddress": "redis:6379",
                                          "redisPasswordSecret": {"name": "redis", "key": "pw"}}},
        },
    )  # fmt: skip
    (dep,) = by_kind(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FORKRL_RAY_ADDRESS"] == "http://ray.elsewhere:8265"
    assert env["FORKRL_POOL_RESOURCES"] == "false"  # a cluster elsewhere: its groups are not known
    (rc,) = by_kind(docs, "RayCluster")
    ft = rc["spec"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "redis:6379"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "redis", "key": "pw"}


def test_secrets_are_referenced_never_embedded(chart):
    for overlay in [None, *OVERLAYS]:
        docs = render(chart, yaml.safe_load(overlay.read_text()) if overlay else {})
        assert not by_kind(docs, "Secret")
        (dep,) = by_kind(docs, "Deployment")
        env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert "valueFrom" in env["FORKRL_ADMIN_TOKEN"] and "value" not in env["FORKRL_ADMIN_TOKEN"]


def test_helm_test_hook_calls_healthz(chart):
    (pod,) = [d for d in render(chart) if d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "/healthz" in pod["spec"]["containers"][0]["command"][-1]


def test_example_rayjob_validates_and_its_config_loads():
    from actors.common.config_load import load_config

    job = yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())
    jsonschema.validate(job, CRD_SCHEMAS["RayJob"])
    jsonschema.validate(job, CRD_SETS[MIN_KUBERAY]["RayJob"])
    argv = job["spec"]["entrypoint"].split()
    assert argv[:3] == ["python", "-m", "actors.train"]
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(ROOT / config, overrides)
    assert str(cfg.trainer.output_dir).startswith("/var/lib/forkrl/runs")


def test_ray_token_auth_and_the_tenancy_policy_reach_every_container(chart):
    values = {"controlPlane": {"tenancy": {"allowedPlugins": ["mylab.rewards:*"], "dataRoots": ["/mnt/datasets"],
                                           "trackingUris": ["http://mlflow:5000"], "allowWandb": True}}}  # fmt: skip
    docs = render(chart, values)
    (dep,) = by_kind(docs, "Deployment")
    (rc,) = by_kind(docs, "RayCluster")
    cp = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    secret = {"name": "forkrl-ray-auth", "key": "auth_token"}
    assert cp["FORKRL_RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == secret
    assert cp["FORKRL_TENANCY"]["value"] == "shared"
    assert json.loads(cp["FORKRL_ALLOWED_PLUGINS"]["value"]) == ["mylab.rewards:*"]
    assert json.loads(cp["FORKRL_DATA_ROOTS"]["value"]) == ["/mnt/datasets"]
    assert json.loads(cp["FORKRL_TRACKING_URIS"]["value"]) == ["http://mlflow:5000"]
    assert cp["FORKRL_ALLOW_WANDB"]["value"] == "true"
    # the settings the control plane reads from that environment are the policy given
    from service.settings import Settings

    env = {k: v["value"] for k, v in cp.items() if k.startswith("FORKRL_") and "value" in v}
    s = Settings(**{k.removeprefix("FORKRL_").lower(): json.loads(v) if v.startswith("[") else v
                    for k, v in env.items() if k in {"FORKRL_TENANCY", "FORKRL_ALLOWED_PLUGINS", "FORKRL_DATA_ROOTS",
                                                     "FORKRL_TRACKING_URIS", "FORKRL_ALLOW_WANDB"}})  # fmt: skip
    assert (s.tenancy, s.allowed_plugins, s.allow_wandb) == ("shared", ["mylab.rewards:*"], True)
    ray_containers = [rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in rc["spec"]["workerGroupSpecs"]
    ]
    for c in ray_containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == secret, c["name"]
    # the tenancy limits: each key set reaches the control plane as the setting of that name, the rest keep
    # the control plane's defaults
    limits = {"maxActiveJobsPerOwner": 4, "submitRatePerMinute": 0.5, "maxJobGpus": 16,
              "allowedRayResources": {"rollout": ["forkrl_rollout", "accelerator_type:*"]}}  # fmt: skip
    (dep,) = by_kind(render(chart, {"controlPlane": {"tenancy": {"limits": limits}}}), "Deployment")
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    keys = ("max_active_jobs_per_owner", "submit_rate_per_minute", "max_job_gpus", "allowed_ray_resources")
    s = Settings(**{k: json.loads(env[f"FORKRL_{k.upper()}"]) for k in keys})
    assert (s.max_active_jobs_per_owner, s.submit_rate_per_minute, s.max_job_gpus, s.max_jobs_per_owner) == (
        4, 0.5, 16, Settings().max_jobs_per_owner)  # fmt: skip
    assert s.allowed_ray_resources == {"rollout": ["forkrl_rollout", "accelerator_type:*"]}
    off = render(chart, {"ray": {"auth": {"enabled": False}}, "controlPlane": {"tenancy": {"mode": "single_user"}}})
    (rc_off,) = by_kind(off, "RayCluster")
    assert "RAY_AUTH_MODE" not in json.dumps(rc_off)


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret", "name"}  # fmt: skip


def _restricted_violations(pod: dict[str, Any], where: str) -> list[str]:
    """The rules of the "restricted" Pod Security Standard (Kubernetes 1.30) that a pod spec breaks."""
    bad = []
    psc = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            bad.append(f"{where}: {flag}")
    for vol in pod.get("volumes") or []:
        if set(vol) - RESTRICTED_VOLUMES:
            bad.append(f"{where}: volume {vol['name']} of type {set(vol) - RESTRICTED_VOLUMES}")
    for c in [*(pod.get("initContainers") or []), *pod["containers"]]:
        sc, name = c.get("securityContext") or {}, f"{where}/{c['name']}"
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append(f"{name}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation")
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []) or set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: capabilities")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            bad.append(f"{name}: hostPort")
    return bad


def _pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    pods = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Pod":
            pods.append((name, d["spec"]))
        elif d["kind"] == "Deployment":
            pods.append((name, d["spec"]["template"]["spec"]))
        elif d["kind"] == "RayCluster":
            pods += _ray_pods(name, d["spec"])
        elif d["kind"] == "ConfigMap" and "rayjob.yaml" in d.get("data", {}):  # Kueue mode: each job's RayJob
            job = yaml.safe_load(d["data"]["rayjob.yaml"])["spec"]
            pods += _ray_pods(name, job["rayClusterSpec"])
            pods.append((f"{name}/submitter", job["submitterPodTemplate"]["spec"]))
    return pods


def _ray_pods(name: str, cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    head = (f"{name}/head", cluster["headGroupSpec"]["template"]["spec"])
    return [head, *((f"{name}/{g['groupName']}", g["template"]["spec"]) for g in cluster["workerGroupSpecs"])]


def test_every_pod_passes_the_restricted_pod_security_level(chart):
    for overlay in [None, *OVERLAYS]:
        docs = render(chart, yaml.safe_load(overlay.read_text()) if overlay else {})
        pods = _pod_specs(docs)
        assert len(pods) >= 6  # control plane, helm test, head and three worker groups
        violations = [v for name, pod in pods for v in _restricted_violations(pod, name)]
        assert not violations, (overlay, violations)
    # the check itself: a root, privileged container is caught
    (dep,) = by_kind(render(chart), "Deployment")
    pod = copy.deepcopy(dep["spec"]["template"]["spec"])
    pod["containers"][0]["securityContext"] = {"privileged": True, "runAsUser": 0}
    assert len(_restricted_violations(pod, "x")) >= 4


def test_network_policies_admit_the_jobs_api_only_from_the_control_plane(chart):
    docs = render(chart)
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(docs, "NetworkPolicy")}
    (rc,) = by_kind(docs, "RayCluster")
    ray_pods = {"forkrl.io/ray": "demo-forkrl"}  # the label of this release's Ray pods: every one has it
    spec = rc["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert ray_pods.items() <= group["template"]["metadata"]["labels"].items()
    ray = policies["demo-forkrl-ray"]
    assert ray["podSelector"]["matchLabels"] == ray_pods
    assert ray["ingress"] == [{"from": [{"podSelector": {"matchLabels": ray_pods}}]}]
    jobs = policies["demo-forkrl-ray-jobs-api"]
    assert jobs["podSelector"]["matchLabels"] == {**ray_pods, "ray.io/node-type": "head"}
    (rule,) = jobs["ingress"]
    (dep,) = by_kind(docs, "Deployment")
    selector = rule["from"][0]["podSelector"]["matchLabels"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items() and selector["app.kubernetes.io/component"] == "control-plane"
    assert rule["ports"] == [{"port": 8265, "protocol": "TCP"}]
    for p in by_kind(docs, "NetworkPolicy"):
        validate(p)
    assert not by_kind(render(chart, {"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_groups_take_volumes_env_from_secrets_labels_and_scheduling(chart):
    models = {"name": "models", "persistentVolumeClaim": {"claimName": "team-models", "readOnly": True}}
    extras = {
        "volumes": [models],
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
        "envFrom": [{"secretRef": {"name": "wandb"}}],
        "podLabels": {"team": "rl"},
        "podAnnotations": {"example.com/owner": "rl-team"},
        "priorityClassName": "training",
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
        ],  # fmt: skip
    }
    docs = render(chart, {"learners": {"replicas": 1, "resources": {}, **extras}, "rayHead": extras})
    (rc,) = by_kind(docs, "RayCluster")
    validate(rc)
    learner = next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "learner")["template"]
    head = rc["spec"]["headGroupSpec"]["template"]
    for tpl in (learner, head):
        spec, c = tpl["spec"], tpl["spec"]["containers"][0]
        assert models in spec["volumes"] and spec["volumes"][0]["name"] == "runs"
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
        assert c["envFrom"] == [{"secretRef": {"name": "wandb"}}]
        assert tpl["metadata"]["labels"]["team"] == "rl" and tpl["metadata"]["labels"]["app.kubernetes.io/part-of"]
        assert tpl["metadata"]["annotations"] == {"example.com/owner": "rl-team"}
        assert spec["priorityClassName"] == "training" and spec["topologySpreadConstraints"][0]["maxSkew"] == 1
    rollout = next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "rollout")["template"]["spec"]
    assert [v["name"] for v in rollout["volumes"]] == ["runs", "shm"]  # only where asked
    with pytest.raises(helm.HelmError, match="mountPath"):
        chart.render({"learners": {"replicas": 1, "resources": {}, "volumeMounts": [{"name": "m"}]}},
                     name="demo", namespace="ml")  # fmt: skip


def test_run_storage_is_shared_by_construction(chart):
    (runs,) = [p for p in by_kind(render(chart), "PersistentVolumeClaim") if p["metadata"]["name"].endswith("-runs")]
    assert runs["spec"]["accessModes"] == ["ReadWriteMany"]  # the default: one volume every Ray pod can mount
    (rc,) = by_kind(render(chart), "RayCluster")
    pods = [rc["spec"]["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]
    ]
    for spec in pods:  # every Ray pod mounts that one claim
        (v,) = [v for v in spec["volumes"] if v["name"] == "runs"]
        assert v["persistentVolumeClaim"]["claimName"] == "demo-forkrl-runs"
    with pytest.raises(helm.HelmError, match="runStorage.enabled=false with 4 Ray pods"):
        chart.render({"runStorage": {"enabled": False}}, name="demo", namespace="ml")
    with pytest.raises(helm.HelmError, match="runStorage.accessMode=ReadWriteOnce is mounted by 5 pods"):
        chart.render({"runStorage": {"accessMode": "ReadWriteOnce"}}, name="demo", namespace="ml")
    # deliberate exceptions: every pod on one node, or a head-only cluster
    render(chart, {"runStorage": {"accessMode": "ReadWriteOnce", "colocated": True}})
    none = {"replicas": 0, "minReplicas": 0, "maxReplicas": 0, "resources": {}}
    head_only = {"runStorage": {"enabled": False}, "rolloutWorkers": none, "rewardWorkers": none, "learners": none}
    assert not [
        p for p in by_kind(render(chart, head_only), "PersistentVolumeClaim") if "runs" in p["metadata"]["name"]
    ]
    # autoscaling counts: a group that may grow past one pod needs the shared claim too
    with pytest.raises(helm.HelmError, match="with 2 Ray pods"):
        chart.render({**head_only, "learners": {**none, "maxReplicas": 1}}, name="demo", namespace="ml")


def test_sse_ingress_service_monitor_and_autoscaling(chart):
    ing = {
        "enabled": True,
        "className": "nginx",
        "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "86400"},
    }
    monitor = {"enabled": True, "labels": {"release": "kps"}}
    docs = render(chart, {"controlPlane": {"ingress": ing, "serviceMonitor": monitor},
                          "ray": {"autoscaling": {"enabled": True, "idleTimeoutSeconds": 120}}})  # fmt: skip
    (ingress,) = by_kind(docs, "Ingress")
    validate(ingress)
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # streams are not buffered
    assert notes["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "86400"  # the user's value wins
    (sm,) = by_kind(docs, "ServiceMonitor")
    (svc,) = by_kind(docs, "Service")
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    # /metrics answers only an admin token or the scrape token: Prometheus sends the one the control plane reads
    token = {"name": "forkrl-metrics", "key": "token"}
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s",
                                        "authorization": {"type": "Bearer", "credentials": token}}]  # fmt: skip
    (dep,) = by_kind(docs, "Deployment")
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FORKRL_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"] == token
    assert env["FORKRL_ADMISSION"]["value"] == "off"  # the autoscaler adds what a waiting job needs
    assert svc["spec"]["ports"][0]["name"] == "http"
    (rc,) = by_kind(docs, "RayCluster")
    validate(rc)
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    opts = rc["spec"]["autoscalerOptions"]
    assert opts["idleTimeoutSeconds"] == 120 and opts["securityContext"]["allowPrivilegeEscalation"] is False
    assert {e["name"] for e in opts["env"]} == {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}  # the autoscaler talks to the GCS
    plain = render(chart, {"controlPlane": {"ingress": {"enabled": True, "sse": False}}})
    assert "annotations" not in by_kind(plain, "Ingress")[0]["metadata"]

    def admission(docs, name="FORKRL_ADMISSION"):
        return {
            e["name"]: e.get("value")
            for e in by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
        }[name]

    assert admission(plain, "FORKRL_PREEMPTION") == "off"
    preempting = render(chart, {"controlPlane": {"preemption": "lower_priority"}})
    assert admission(preempting, "FORKRL_PREEMPTION") == "lower_priority"

    assert admission(plain) == "queue"  # a fixed cluster: jobs wait until they fit
    assert (
        admission(render(chart, {"controlPlane": {"admission": "queue"}, "ray": {"autoscaling": {"enabled": True}}}))
        == "queue"
    )
    assert (
        not by_kind(plain, "ServiceMonitor")
        and "enableInTreeAutoscaling" not in by_kind(plain, "RayCluster")[0]["spec"]
    )
