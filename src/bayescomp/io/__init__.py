"""Files: the packed compressed model (.bcz: sparse, entropy-coded) and the plain one (spec + tensors)."""

from .packed import PackedFileError, load, pack, packed_report, read_packed, save, unpack
from .plain import ModelFileError, build_from_spec, build_graph, graph_spec, load_plain, model_spec, save_plain

__all__ = [
    "ModelFileError",
    "PackedFileError",
    "build_from_spec",
    "build_graph",
    "graph_spec",
    "load",
    "load_plain",
    "model_spec",
    "pack",
    "packed_report",
    "read_packed",
    "save",
    "save_plain",
    "unpack",
]
