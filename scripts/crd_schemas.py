"""Extract the CRD schemas the chart's tests check against, from a checkout of the project.

    python scripts/crd_schemas.py kuberay /path/to/kuberay-checkout v1.5.2 v1.6.0
    python scripts/crd_schemas.py kueue /path/to/kueue-checkout v0.19.2

For each tag: the CRD files as of that tag (git show), the served version's openAPIV3Schema without its
`description` texts (most of the size), written to tests/helm/crds/<folder>/<Kind>.json: KubeRay's
RayCluster and RayJob (`v1`, folder <tag>; the newest CRDs live in ../shared/schemas/kuberay) and
Kueue's ResourceFlavor, ClusterQueue, LocalQueue and WorkloadPriorityClass (`v1beta2`, folder
kueue-<tag>).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "helm" / "crds"
# project -> (directory of its CRDs, version served, folder prefix, kind -> file)
PROJECTS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "kuberay": ("ray-operator/config/crd/bases", "v1", "", {
        "RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}),
    "kueue": ("config/components/crd/bases", "v1beta2", "kueue-", {
        "ResourceFlavor": "kueue.x-k8s.io_resourceflavors.yaml", "ClusterQueue": "kueue.x-k8s.io_clusterqueues.yaml",
        "LocalQueue": "kueue.x-k8s.io_localqueues.yaml",
        "WorkloadPriorityClass": "kueue.x-k8s.io_workloadpriorityclasses.yaml"}),
}  # fmt: skip


def strip(node: Any, field_names: bool = False) -> Any:
    """The schema without its `description` texts; a field named description (a key of `properties`) stays."""
    if isinstance(node, dict):
        return {k: strip(v, k == "properties" and not field_names) for k, v in node.items()
                if field_names or k != "description"}  # fmt: skip
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(project: str, repo: str, *tags: str) -> int:
    folder, version, prefix, files = PROJECTS[project]
    for tag in tags:
        for kind, name in files.items():
            text = subprocess.run(
                ["git", "-C", repo, "show", f"{tag}:{folder}/{name}"], check=True, capture_output=True, text=True
            ).stdout
            crd = yaml.safe_load(text)
            (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
            dest = OUT / f"{prefix}{tag}" / f"{kind}.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            schema = strip(served["schema"]["openAPIV3Schema"])
            dest.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True))
            print(f"{dest}: {dest.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
