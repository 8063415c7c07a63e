"""decafa-fast, in two layers:

- the op library: `decafa_fast.ops` (fused spatial softmax, soft-argmax, attention mask, F1-F5 fusion and
  the DeCaFA head for PyTorch, on CPU (C++) and CUDA (Triton, CUDA C++)), `reference` (the plain-PyTorch
  oracle), `nn` (kornia-compatible modules), `triton`, `autotable` and the compiled `_C`;
- the application, `decafa_fast.app`: the DeCaFA face-alignment model, data, training, evaluation,
  prediction, export and the `decafa-fast` command line, built on the op library.

Importing the library loads nothing of the application (no OpenCV, matplotlib or tqdm)."""
__version__ = "0.1.0"

from . import ops, reference  # noqa: F401


def __getattr__(name: str):
    # FaceAligner pulls in OpenCV and the model: import it only when asked for (decafa_fast.FaceAligner).
    if name == "FaceAligner":
        from .app.prediction.aligner import FaceAligner

        return FaceAligner
    raise AttributeError(f"module 'decafa_fast' has no attribute {name!r}")
