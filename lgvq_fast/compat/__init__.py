"""The peers' quantizer classes on lgvq_fast's fused ops: change one import line, keep the checkpoints.

- ``VectorQuantize`` (and ``LossBreakdown``): vector-quantize-pytorch's ``VectorQuantize``;
- ``VectorQuantizer2``: taming-transformers' ``taming.modules.vqvae.quantize.VectorQuantizer2``.

Same constructor arguments, forward results and state_dict keys as the peers; the nearest-code search
is ``lgvq_fast.ops.nearest_code`` and the EMA update ``lgvq_fast.ops.ema_update_``. Neither peer is
imported (nor needed) by this package; the classes load on first access.
"""

__all__ = ["LossBreakdown", "VectorQuantize", "VectorQuantizer2"]


def __getattr__(name):
    if name in ("VectorQuantize", "LossBreakdown"):
        from lgvq_fast.compat import vq

        return getattr(vq, name)
    if name == "VectorQuantizer2":
        from lgvq_fast.compat.taming import VectorQuantizer2

        return VectorQuantizer2
    raise AttributeError(f"module 'lgvq_fast.compat' has no attribute {name!r}")
