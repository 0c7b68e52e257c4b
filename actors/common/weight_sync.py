"""The weight-sync protocol, learner -> rollout engines: its format, its versions, both sides.

Format: the learner's full model in the rollout dtype as one safetensors file in shared memory
(/dev/shm), written aside and renamed over the previous one. Tensors that share storage (a tied
lm_head) are stored once; the metadata names their aliases (`ALIASES`), because vLLM's in-place
reload on CPU keeps a tied head at its old weights unless it is sent under its own name. The
metadata also carries the protocol number (`PROTOCOL`) and the policy version (the learner's
optimizer steps so far), which the receiver checks and reports. With LoRA (`model.lora.sync:
adapter`) the file is the adapter alone, PEFT's adapter_model.safetensors beside its
adapter_config.json (the folder vLLM's LoRA loader reads); the engine loads it as its LoRA adapter.

Send (the learner, rank 0): `write_weights` writes the file and returns its `WeightsFile`; an
engine on another node asks the owner for the bytes (`read_weights`).
Receive (each rollout engine): `local_copy` gives a path on the engine's node (the learner's file
itself when on the same node); `WeightSyncExtension`, mixed into vLLM's worker class, reloads it
tensor by tensor with vLLM's in-place `reload_weights` (the CPU backend repacks linear weights
after loading, so a plain `load_weights` fails there; NOTES.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILE",
    "ALIASES",
    "PROTOCOL",
    "WeightSyncExtension",
    "WeightsFile",
    "file_header",
    "is_local",
    "local_copy",
    "node_id",
    "read_weights",
    "shm_dir",
    "write_weights",
]

PROTOCOL = "1"
ALIASES = "forkrl_aliases"  # metadata: {name: stored name} of tensors that share storage
_PROTOCOL_KEY, _VERSION_KEY = "forkrl_protocol", "forkrl_version"
FILE_NAME = "weights.safetensors"
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # PEFT's names


@dataclass(frozen=True)
class WeightsFile:
    """The learner's weights as a safetensors file in shared memory on one node.

    `owner` is the learner actor that wrote it: an engine on another node asks it for the bytes
    (`read_weights`). The file is replaced at the next export, so a late reader gets the newest
    weights, which is what an engine replaced mid-run must load anyway. `version`: the learner's
    optimizer steps when it was written. `adapter_config`: a LoRA adapter's adapter_config.json (the
    file then holds the adapter alone); None: the full model."""

    path: str
    node_id: str
    nbytes: int
    owner: Any = None
    version: int = 0
    adapter_config: str | None = None


def node_id() -> str:
    """Ray's id of this process's node ("" outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except ImportError:
        return ""


def shm_dir(prefix: str) -> str:
    """A new private folder in shared memory (/dev/shm where there is one)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/dev/shm" if os.path.isdir("/dev/shm") else None)


# -- send ------------------------------------------------------------------------------------------


def write_weights(
    state: Iterable[tuple[str, Any]], dtype: str, directory: str, version: int, name: str = FILE_NAME,
    adapter_config: str | None = None,
) -> WeightsFile:  # fmt: skip
    """Write a model's state (name, tensor) pairs in `dtype` to `directory`/`name` (a LoRA adapter: with
    its adapter_config.json beside it).

    No copy where the dtype and device already match: the tensors are written out before anything
    changes them. The owner is this Ray actor (None outside one)."""
    import torch
    from safetensors.torch import save_file

    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    out: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for k, v in state:
        if v.data_ptr() in first:
            aliases[k] = first[v.data_ptr()]
            continue
        first[v.data_ptr()] = k
        out[k] = v.detach().to(tdtype).contiguous().cpu()
    meta = {ALIASES: json.dumps(aliases), _PROTOCOL_KEY: PROTOCOL, _VERSION_KEY: str(version)}
    path = os.path.join(directory, name)
    if adapter_config is not None:
        _write_text(os.path.join(directory, ADAPTER_CONFIG), adapter_config)
    save_file(out, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)
    import ray

    owner = ray.get_runtime_context().current_actor if ray.is_initialized() else None
    return WeightsFile(path, node_id(), os.path.getsize(path), owner, version, adapter_config)


def _write_text(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def read_weights(path: str, directory: str | None) -> bytes:
    """The bytes of a weights file written to `directory` (for an engine on another node)."""
    if directory is None or os.path.dirname(path) != directory:
        raise ValueError(f"{path} is not a weights file of this learner")
    with open(path, "rb") as f:
        return f.read()


# -- receive ---------------------------------------------------------------------------------------


def is_local(weights: WeightsFile) -> bool:
    """Whether the learner's file itself can be read here (this is its node)."""
    return weights.node_id == node_id() and os.path.exists(weights.path)


def local_copy(weights: WeightsFile, scratch: str, blob: bytes | None = None) -> tuple[str, str | None]:
    """(a path to these weights on this node, the copy made here to remove afterwards or None):
    the learner's own file on its node; elsewhere its bytes (`blob`, or asked of the owner here),
    written to scratch (an adapter's with its adapter_config.json)."""
    if blob is None and is_local(weights):
        return weights.path, None
    if blob is None:
        import ray

        blob = ray.get(weights.owner.read_weights.remote(weights.path))
    own = os.path.join(scratch, os.path.basename(weights.path))
    if weights.adapter_config is not None:
        _write_text(os.path.join(scratch, ADAPTER_CONFIG), weights.adapter_config)
    with open(own, "wb") as f:
        f.write(blob)
    return own, own


def _named_tensors(f: Any) -> tuple[list[tuple[str, str]], int]:
    """(name, stored name) of every tensor to load, aliases included, and the file's policy version."""
    meta = f.metadata() or {}
    if meta.get(_PROTOCOL_KEY) != PROTOCOL:
        raise ValueError(f"weights file protocol {meta.get(_PROTOCOL_KEY)!r}; this engine reads {PROTOCOL!r}")
    aliases = json.loads(meta.get(ALIASES, "{}"))  # e.g. a tied lm_head
    names = [(k, k) for k in f.keys()] + list(aliases.items())  # noqa: SIM118 (a safe_open handle, not a dict)
    return names, int(meta.get(_VERSION_KEY, "0"))


def file_header(path: str) -> tuple[int, int]:
    """(tensors, policy version) of a weights file (its protocol checked), read from its header alone."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        names, version = _named_tensors(f)
        return len(names), version


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`)."""

    def forkrl_watch_engine(self, pid: int) -> bool:
        """End this worker and its engine-core process once the engine actor (process `pid`) is gone: vLLM's
        processes outlive an actor that is killed rather than shut down, holding the memory its replacement
        needs. A thread polls once a second; the processes are named by psutil (never a reused pid)."""
        import threading

        import psutil

        if pid == os.getpid():  # vLLM runs in the actor's own process: it ends with it
            return False
        engine, core = psutil.Process(pid), psutil.Process(os.getppid())

        def alive() -> bool:
            try:
                return bool(engine.is_running() and engine.status() != psutil.STATUS_ZOMBIE)
            except psutil.Error:
                return False

        def watch() -> None:
            while alive():
                time.sleep(1.0)
            for p in (core, psutil.Process()):  # the engine core (this worker's parent, if not the actor), then us
                if p.pid not in (1, pid) and p.is_running():
                    with contextlib.suppress(psutil.Error):
                        p.kill()

        threading.Thread(target=watch, name="forkrl-engine-watch", daemon=True).start()
        return True

    def forkrl_reload_weights(self, path: str) -> tuple[int, int]:
        """Reload every tensor of the file in place: (tensors loaded, the file's policy version)."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:  # one tensor at a time: no second copy of the model
            names, version = _named_tensors(f)
            weights = ((name, f.get_tensor(src)) for name, src in names)
            self.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]
        return len(names), version
