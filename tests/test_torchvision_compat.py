"""torchvision's model code imports and runs beside the CPU torch (its C extension may not)."""

import subprocess
import sys

import pytest


def test_torchvision_models_import_and_run_in_a_fresh_process() -> None:
    # a fresh interpreter: the import must work from nothing, not from a module already loaded
    code = (
        "from toolchain.build.torchvision_compat import import_torchvision\n"
        "import torch\n"
        "tv = import_torchvision()\n"
        "m = tv.models.resnet18(num_classes=7).eval()\n"
        "with torch.no_grad():\n"
        "    out = m(torch.zeros(2, 3, 32, 32))\n"
        "print(tuple(out.shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(2, 7)"


def test_a_detection_op_still_fails_loudly_without_the_extension() -> None:
    import torch

    from toolchain.build.torchvision_compat import import_torchvision

    tv = import_torchvision()
    if tv.extension._has_ops():
        pytest.skip("torchvision's C extension loads here: its ops are real")
    with pytest.raises((RuntimeError, NotImplementedError)):
        tv.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
