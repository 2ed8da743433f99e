"""bayescomp: Bayesian Compression for deep learning (Louizos, Ullrich & Welling, NIPS 2017).

>>> import bayescomp
>>> bmodel = bayescomp.bayesianize(model, prior="gnj")                  # doctest: +SKIP
>>> loss = ce + bayescomp.kl_divergence(bmodel) / len(train_set)        # doctest: +SKIP
>>> result = bayescomp.compress(bmodel)                                  # doctest: +SKIP
"""

from . import nn
from .check import CheckReport, check
from .compress import CompressedModel, compress, graph_compress, register_channelwise
from .compress.costs import multiply_adds
from .convert import CompressionWarning, UnsupportedLayerError, bayesianize, kl_divergence
from .io.export import export_onnx
from .io.packed import PackedFileError, load, save
from .pretrained import compress_pretrained

__version__ = "0.1.0"

__all__ = ["CheckReport", "CompressedModel", "CompressionWarning", "check", "export_onnx", "compress_pretrained", "PackedFileError", "UnsupportedLayerError", "graph_compress", "nn", "register_channelwise", "load", "save", "bayesianize", "compress", "kl_divergence", "multiply_adds", "__version__"]
