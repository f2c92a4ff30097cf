"""The on-device runtime: verify and load an edgepack bundle, run it, benchmark it.
numpy plus one backend; never torch.

    import runtime
    with runtime.load("model.edgepack") as model:
        ids, confidence = model.classify(batch)
"""

from runtime.bundle import BundleError
from runtime.model import Model, SelfTestResult, load

__all__ = ["BundleError", "Model", "SelfTestResult", "load"]
__version__ = "0.1.0"
