"""decafa-fast: fused spatial softmax, soft-argmax, attention mask, F1-F5 fusion and the DeCaFA head for PyTorch,
on CPU (C++) and CUDA (Triton, CUDA C++).

The package root is the op library: `ops` (the ops, autograd, backend choice), `nn` (kornia-compatible
modules) and `reference` (the plain-PyTorch oracle). It needs torch and numpy alone and loads nothing of the
face-alignment application, `decafa_fast.app` (the DeCaFA model, data, training, evaluation, prediction,
export and the `decafa-fast` command line), which comes with the `app` extra: pip install "decafa-fast[app]".
"""
__version__ = "0.1.0"

from . import nn, ops, reference

__all__ = ["__version__", "nn", "ops", "reference"]
