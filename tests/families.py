"""The architecture families users bring, as torchvision's own model code at tiny sizes: the
layer kinds of each family (residuals, depthwise convolutions, squeeze-excitation, channel
shuffle, group convolutions, concatenation, LayerNorm, attention, shifted windows) with few
channels, so a whole build of each takes seconds. Every factory takes 3x32x32 inputs and
gives `num_classes` logits; `tests/test_families.py` walks the registry.

A factory is `name -> callable(num_classes=10)`; `--model tests.families:<function>` builds it."""

from __future__ import annotations

from typing import Any


def _tv() -> Any:
    from toolchain.build.torchvision_compat import import_torchvision

    return import_torchvision()


def resnet(num_classes: int = 10) -> Any:
    _tv()  # first: it makes torchvision importable here
    from torchvision.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, width_per_group=64)


def mobilenet_v2(num_classes: int = 10) -> Any:
    return _tv().models.mobilenet_v2(num_classes=num_classes, width_mult=0.25)


def mobilenet_v3(num_classes: int = 10) -> Any:
    return _tv().models.mobilenet_v3_small(num_classes=num_classes, width_mult=0.25)


def efficientnet(num_classes: int = 10) -> Any:
    _tv()  # first: it makes torchvision importable here
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig
    setting = [MBConvConfig(1, 3, 1, 16, 8, 1), MBConvConfig(4, 3, 2, 8, 16, 1),
               MBConvConfig(4, 5, 2, 16, 24, 1)]
    return EfficientNet(setting, dropout=0.1, stochastic_depth_prob=0.1,
                        num_classes=num_classes, last_channel=64)


def shufflenet_v2(num_classes: int = 10) -> Any:
    return _tv().models.ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=num_classes)


def squeezenet(num_classes: int = 10) -> Any:
    return _tv().models.squeezenet1_1(num_classes=num_classes)


def mnasnet(num_classes: int = 10) -> Any:
    return _tv().models.MNASNet(0.25, num_classes=num_classes)


def regnet(num_classes: int = 10) -> Any:
    _tv()  # first: it makes torchvision importable here
    from torchvision.models.regnet import BlockParams, RegNet
    params = BlockParams.from_init_params(depth=3, w_0=16, w_a=8.0, w_m=2.0, group_width=8,
                                          se_ratio=0.25)
    return RegNet(params, num_classes=num_classes, stem_width=16)


def densenet(num_classes: int = 10) -> Any:
    return _tv().models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                 bn_size=2, num_classes=num_classes)


def convnext(num_classes: int = 10) -> Any:
    _tv()  # first: it makes torchvision importable here
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    setting = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
    return ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=num_classes)


def vit(num_classes: int = 10) -> Any:
    return _tv().models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                          hidden_dim=32, mlp_dim=64, num_classes=num_classes)


def swin(num_classes: int = 10) -> Any:
    return _tv().models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                        num_heads=[1, 2], window_size=[4, 4],
                                        stochastic_depth_prob=0.1, num_classes=num_classes)


FAMILIES = {f.__name__: f for f in (resnet, mobilenet_v2, mobilenet_v3, efficientnet,
                                    shufflenet_v2, squeezenet, mnasnet, regnet, densenet,
                                    convnext, vit, swin)}


TARGETS = ("smartphone", "edge-x86")  # LiteRT int8 with pruning; OpenVINO int8
# one short build per case: the mechanics of every family, not its accuracy (the quantization
# fallback is tests/test_compression.py's)
QUICK = ("--epochs", "1", "--set", "prune.steps=1", "--set", "prune.finetune_epochs=1",
         "--set", "distill.epochs=1", "--set", "quantize.calibration_samples=32",
         "--set", "quantize.fallback=false",
         "--bench-runs", "10", "--quiet")


def write_digits_rgb(path: Any, samples: int = 300, side: int = 32) -> Any:
    """scikit-learn's digits as 3 x side x side images (pixels repeated), in an .npz."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.kron(digits.images[:samples].astype(np.float32) / 16.0,
                np.ones((side // 8, side // 8), np.float32))
    np.savez(path, x=np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1)),
             y=digits.target[:samples].astype(np.int64))
    return path


def build_family(family: str, target: str, data: Any, out: Any) -> tuple[int, str, Any]:
    """`toolchain build` of one family for one target, in a process of its own (a long run
    of in-process builds keeps each converter's memory: 24 of them grew past 19 GB):
    (exit code, output, the report path)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = Path(out)
    report = out / "report.json"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(
        [sys.executable, "-m", "toolchain", "build", "--target", target, "--model",
         f"tests.families:{family}", "--data", str(data), "--out", str(out / "bundle"),
         "--json", str(report), *QUICK],
        capture_output=True, text=True, timeout=1200, env=env, cwd=root)
    return done.returncode, done.stdout + done.stderr, report


TABLE_HEADER = ("| family | target | exit | why 3 | params before -> after | MACs before -> after "
                "| accuracy before -> after | kept whole | seconds |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def table_row(family: str, target: str, code: int, report_path: Any, seconds: float) -> str:
    """One row of the family matrix (benchmarks/family_matrix.py; tests/test_families.py
    appends it to the file named by EDGEPACK_FAMILY_TABLE when that is set)."""
    import json
    from pathlib import Path

    if not Path(report_path).exists():
        return f"| {family} | {target} | {code} | no report | | | | | {seconds:.0f} |"
    r = json.loads(Path(report_path).read_text())
    ref, fin = r["reference"], r["final"]
    kept = next((n.split("kept whole: ", 1)[1] for n in r["notes"]
                 if n.startswith("pruning: kept whole")), "")
    skipped = next((n for n in r["notes"] if n.startswith("pruning skipped")), "")
    why = "did not learn" if r.get("not_learned") else ", ".join(
        b["name"] for b in r["budgets"] if b.get("ok") is False)
    return (f"| {family} | {target} | {code} | {why if code == 3 else ''} | "
            f"{ref['params']:,} -> {fin['params']:,} | {ref['macs']:,} -> {fin['macs']:,} | "
            f"{ref['accuracy']:.1%} -> {fin['accuracy']:.1%} | {(kept or skipped)[:90]} | "
            f"{seconds:.0f} |")
