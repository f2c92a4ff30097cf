"""Model ingest: turn a `--model` reference into a model the pipeline can work on.

Accepted: `path/to/file.py:factory` or `package.module:factory` (a function returning an
nn.Module), an `.onnx` file, an ExportedProgram `.pt2` file, and, only when the user says
they trust it, a pickled `.pt`/`.pth` module. No reference means the built-in demo CNN.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.build.safe_archive import one_line
from toolchain.errors import UsageError

MODEL_FORMS = ("path/to/file.py:factory", "package.module:factory", "model.onnx", "model.pt2",
               "model.pt (with --trust-pickle)")


@dataclass
class IngestedModel:
    name: str
    kind: str  # "torch" (an nn.Module we can train, prune, export) or "onnx" (a file, as is)
    module: Any | None  # the nn.Module for "torch"
    onnx_path: Path | None  # the file for "onnx"
    source_sha256: str | None  # of the file the model came from; None for the built-in
    needs_training: bool
    description: str
    traced: bool = False  # a torch.export graph: runs and exports, cannot be pruned or trained
    head: str | None = None  # the classifier's module name once --replace-head replaced it


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _forms() -> str:
    return "; --model takes " + ", ".join(MODEL_FORMS)


def ingest_model(ref: str | None, *, in_channels: int | None, num_classes: int | None,
                 pretrained: bool,
                 trust_pickle: bool, seed: int = 0, demo: str = "demo-cnn") -> IngestedModel:
    """`demo`: the built-in model (models.DEMO_MODELS) to use when `ref` is None."""
    if ref is None or ":" in ref:
        import torch

        torch.manual_seed(seed)  # a freshly built model's initial weights follow the seed
    if ref is None:
        from toolchain.build.models import DEMO_MODELS

        factory, what = DEMO_MODELS[demo]
        return IngestedModel(demo, "torch", factory(in_channels, num_classes), None, None,
                             True, what)
    suffix = Path(ref).suffix.lower()
    if suffix in (".onnx", ".pt2", ".pt", ".pth"):
        path = Path(ref)
        if not path.is_file():
            raise UsageError(f"model file {ref!r} not found (or not a regular file){_forms()}")
        try:
            if suffix == ".onnx":
                return _onnx(path)
            if suffix == ".pt2":
                return _exported_program(path, trust_pickle)
            return _pickle(path, trust_pickle)
        except OSError as exc:  # unreadable (permissions, I/O errors)
            raise UsageError(f"model {ref!r}: cannot be read ({one_line(exc)})") from exc
    if ":" in ref:
        return _factory(ref, in_channels, num_classes, pretrained, seed)
    raise UsageError(f"model reference {ref!r} is not understood{_forms()}")


def _onnx(path: Path) -> IngestedModel:
    from toolchain.build.onnx_check import check_onnx

    check_onnx(path)
    return IngestedModel(path.stem, "onnx", None, path, _sha256(path), False,
                         f"ONNX model {path.name} (taken as trained)")


def _exported_program(path: Path, trust_pickle: bool) -> IngestedModel:
    import torch

    from toolchain.build.pt2_check import checked_pt2

    source = str(path) if trust_pickle else checked_pt2(path)
    try:
        program = torch.export.load(source)
    except Exception as exc:
        raise UsageError(f"model {path}: not a loadable ExportedProgram .pt2 "
                         f"({one_line(exc)})") from exc
    return IngestedModel(path.stem, "torch", program.module(), None, _sha256(path), False,
                         f"ExportedProgram {path.name} (taken as trained)", traced=True)


def _pickle(path: Path, trust_pickle: bool) -> IngestedModel:
    if not trust_pickle:
        raise UsageError(
            f"model {path}: .pt/.pth files are pickles that can run arbitrary code when loaded; "
            "pass --trust-pickle if you trust this file, or export it as .pt2 or .onnx"
        )
    import torch

    try:
        obj = torch.load(str(path), weights_only=True)
    except Exception:  # a whole pickled module is beyond weights_only: the user trusts it
        try:
            obj = torch.load(str(path), weights_only=False)
        except Exception as exc:
            raise UsageError(f"model {path}: cannot be loaded ({one_line(exc)})") from exc
    if not isinstance(obj, torch.nn.Module):
        raise UsageError(
            f"model {path}: holds a {type(obj).__name__}, not a whole nn.Module (a state_dict "
            "needs its architecture: give a factory, path/to/file.py:factory)"
        )
    return IngestedModel(path.stem, "torch", obj, None, _sha256(path), False,
                         f"pickled module {path.name} (trusted; taken as trained)")


def _factory(ref: str, in_channels: int | None, num_classes: int | None,
             pretrained: bool, seed: int) -> IngestedModel:
    import torch

    where, _, attr = ref.rpartition(":")
    if not where or not attr:
        raise UsageError(f"model reference {ref!r} needs the form module:factory{_forms()}")
    source_sha = None
    if where.endswith(".py"):
        # the user's own file, run on purpose: as trusted as running `python file.py`
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"model file {where!r} not found{_forms()}")
        module = _import_file(path, ref)
        source_sha = _sha256(path)
    else:
        if where == "torchvision" or where.startswith("torchvision."):
            from toolchain.build.torchvision_compat import import_torchvision

            import_torchvision()  # importable beside a torch it was not built for
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise UsageError(f"model module {where!r} cannot be imported "
                             f"({one_line(exc)}){_forms()}") from exc
        except (Exception, SystemExit) as exc:  # the module's own code failed
            raise UsageError(f"model {ref}: importing {where} failed: "
                             f"{type(exc).__name__}: {one_line(exc)}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UsageError(f"model reference {ref!r}: {where} has no callable {attr!r} "
                         f"(callables there: {one_line(', '.join(found) or 'none')})")
    model = _call_factory(factory, ref, in_channels, num_classes, seed)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"model factory {ref} returned a {type(model).__name__}, not an "
                         "nn.Module; a factory must return the model (a torch.nn.Module)")
    label = "pretrained" if pretrained else "to be trained"
    return IngestedModel(attr, "torch", model, None, source_sha, not pretrained,
                         f"factory {ref} ({label})")


def factory_kwargs(factory: Any, in_channels: int | None,
                   num_classes: int | None) -> tuple[dict[str, int], bool]:
    """The keyword arguments a factory gets, and whether `in_channels` went in only through
    `**kwargs` (a guess: such factories often pass **kwargs on to a class that does not take
    it, as torchvision's do, so the call is retried without it)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature get no keyword arguments
        params = {}
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
              if v is not None and (k in params or open_kwargs)}
    return kwargs, "in_channels" in kwargs and "in_channels" not in params


def _call_factory(factory: Any, ref: str, in_channels: int | None, num_classes: int | None,
                  seed: int) -> Any:
    import torch

    kwargs, guessed = factory_kwargs(factory, in_channels, num_classes)
    try:
        try:
            return factory(**kwargs)
        except TypeError as exc:
            if not guessed or "in_channels" not in str(exc):
                raise
            kwargs.pop("in_channels")
            torch.manual_seed(seed)  # the same initial weights as a first call would have had
            return factory(**kwargs)
    except (Exception, SystemExit) as exc:
        raise UsageError(f"model factory {ref}: calling it failed: "
                         f"{type(exc).__name__}: {one_line(exc)}") from exc


def _import_file(path: Path, ref: str) -> Any:
    name = f"edgepack_user_model_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"model {ref}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a syntax error, an exception, an exit() at import
        sys.modules.pop(name, None)
        raise UsageError(f"model file {path}: importing it failed: "
                         f"{type(exc).__name__}: {one_line(exc)}") from exc
    return module


def check_fits(model: IngestedModel, sample: np.ndarray, num_classes: int) -> None:
    """Run the model once on preprocessed data: a shape mismatch is a usage error, named."""
    shape = tuple(sample.shape[1:])
    if model.kind == "onnx":
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(model.onnx_path),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # a graph the checker passed but ONNX Runtime cannot run
            raise UsageError(f"model {model.onnx_path}: ONNX Runtime cannot load it "
                             f"({one_line(exc)})") from exc
        meta = session.get_inputs()[0]
        expected = tuple(meta.shape[1:])
        if len(expected) != len(shape) or any(
            isinstance(e, int) and e != s for e, s in zip(expected, shape, strict=False)
        ):
            raise UsageError(f"data samples have shape {shape} but model {model.name} takes "
                             f"{tuple(meta.shape)}")
        try:
            out = session.run(None, {meta.name: sample[:1]})[0]
        except Exception as exc:
            raise UsageError(f"model {model.name} fails on data of shape {shape}: "
                             f"{one_line(exc)}") from exc
    else:
        import torch

        from targets.base import eval_mode

        eval_mode(model.module)
        try:
            with torch.no_grad():
                out = model.module(torch.from_numpy(sample[:1])).numpy()
        except Exception as exc:
            raise UsageError(
                f"model {model.name} does not accept data samples of shape {shape}: "
                f"{_channels_hint(model.module, shape)}{one_line(exc)}"
            ) from exc
    if out.ndim != 2 or out.shape[1] != num_classes:
        hint = "" if model.kind == "onnx" or model.traced else (
            "; a pretrained model's head is swapped for one that fits with --pretrained "
            "--replace-head, and a model to train is built to fit by a factory that takes "
            "num_classes (by name or through **kwargs)")
        raise UsageError(f"model {model.name} gives outputs of shape {tuple(out.shape)}; the "
                         f"data has {num_classes} classes, so it must give (N, {num_classes})"
                         + hint)


def _channels_hint(module: Any, shape: tuple[int, ...]) -> str:
    """When the first convolution expects other input channels than the data has, say that
    first: the error torch raises names weights and groups, not channels."""
    import torch.nn as nn

    first = next((m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None or len(shape) < 2 or first.in_channels == shape[0]:
        return ""
    return (f"the model takes {first.in_channels} input channels, the data has {shape[0]} "
            "(give the factory an in_channels parameter, or data with "
            f"{first.in_channels} channels): ")
