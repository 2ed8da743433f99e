"""Files: the plain compressed model (spec + tensors, no pickled code)."""

from .plain import ModelFileError, build_from_spec, load_plain, model_spec, save_plain

__all__ = ["ModelFileError", "build_from_spec", "load_plain", "model_spec", "save_plain"]
