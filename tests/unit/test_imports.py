"""The config schema and the control plane import without the heavy runtime."""

import subprocess
import sys

HEAVY = ("torch", "ray", "vllm", "deepspeed")


def test_config_and_service_import_without_torch_ray_vllm_deepspeed():
    code = (
        "import sys, actors.config, service\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('service.app'): import service.app\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout.strip()}"


def test_the_check_can_fail():
    # the same probe sees torch when something does import it
    code = "import sys, actors.config, actors.grpo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
