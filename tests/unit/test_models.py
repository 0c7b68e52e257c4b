"""Model bootstrap: the cache is reused, a corrupt one is detected and rebuilt."""

import json
import os

import pytest

from actors.common.models import TINY, cache_dir, ensure_model, is_complete, resolve_dtype, resolve_model_path

REAL = cache_dir() / "smollm2-135m-instruct"
pytestmark = pytest.mark.skipif(not is_complete(REAL), reason="model cache not built: run `make model` first")


def test_builtin_name_resolves_to_a_complete_checkpoint():
    path = resolve_model_path("smollm2-135m-instruct")
    assert is_complete(REAL) and path == str(REAL)
    files = json.loads((REAL / "forkrl-manifest.json").read_text())["files"]
    assert files["model.safetensors"] > 500_000_000  # fp32 135M params
    assert "chat_template.jinja" in files or "tokenizer_config.json" in files


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path):
    os.symlink(REAL, tmp_path / "smollm2-135m-instruct")  # reuse the big model, rebuild the tiny one
    tiny = ensure_model(TINY, tmp_path)
    assert is_complete(tiny)
    mtime = (tiny / "model.safetensors").stat().st_mtime_ns
    assert ensure_model(TINY, tmp_path) == tiny  # no-op
    assert (tiny / "model.safetensors").stat().st_mtime_ns == mtime
    with open(tiny / "model.safetensors", "r+b") as f:  # a partial write
        f.truncate(1000)
    assert not is_complete(tiny)
    ensure_model(TINY, tmp_path)
    assert is_complete(tiny)
    (tiny / "forkrl-manifest.json").unlink()  # interrupted before the manifest: incomplete
    assert not is_complete(tiny)


def test_unknown_names_are_rejected_clearly():
    with pytest.raises(ValueError, match="neither a built-in model"):
        resolve_model_path("no-such-model")
    assert resolve_dtype("float32") == "float32"


def test_auto_dtype_follows_the_cpu_flags(tmp_path):
    # bf16 only where the CPU computes it natively; AVX2-only boxes run bf16 several times slower
    avx2, amx, missing = tmp_path / "avx2", tmp_path / "amx", tmp_path / "none"
    avx2.write_text("flags\t: fpu sse2 avx avx2 fma\n")
    amx.write_text("flags\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert resolve_dtype("auto", cpuinfo=avx2) == "float32"
    assert resolve_dtype("auto", cpuinfo=amx) == "bfloat16"
    assert resolve_dtype("auto", cpuinfo=missing) == "float32"


@pytest.mark.slow
def test_transformers_loads_the_converted_model():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(REAL))
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
