"""lgvq_fast: fused vector-quantization ops and the LG-VQ tokenizer.

Importing this package needs only torch and numpy; triton, the compiled
extension and transformers are imported when first used.
"""
from lgvq_fast import ops

__version__ = "0.1.0"

__all__ = ["ops", "VectorQuantizer", "CVQVectorQuantizer", "__version__"]


def __getattr__(name):
    if name == "VectorQuantizer":
        from lgvq_fast.quantize import VectorQuantizer

        return VectorQuantizer
    if name == "CVQVectorQuantizer":
        from lgvq_fast.quantize_cvq import CVQVectorQuantizer

        return CVQVectorQuantizer
    raise AttributeError(f"module 'lgvq_fast' has no attribute {name!r}")
