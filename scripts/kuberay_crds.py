"""Extract the RayCluster and RayJob schemas of KubeRay releases for the chart's tests.

    python scripts/kuberay_crds.py /path/to/kuberay-checkout v1.5.2 v1.6.0

For each tag: ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml as of that tag (git
show), the `v1` version's openAPIV3Schema without its `description` texts (most of the size),
written to tests/helm/crds/<tag>/<Kind>.json. The newest CRDs live in ../shared/schemas/kuberay.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "helm" / "crds"
FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(repo: str, *tags: str) -> int:
    for tag in tags:
        for kind, name in FILES.items():
            text = subprocess.run(
                ["git", "-C", repo, "show", f"{tag}:ray-operator/config/crd/bases/{name}"],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            crd = yaml.safe_load(text)
            (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            dest = OUT / tag / f"{kind}.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(strip(v1["schema"]["openAPIV3Schema"]), separators=(",", ":"), sort_keys=True))
            print(f"{dest}: {dest.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
