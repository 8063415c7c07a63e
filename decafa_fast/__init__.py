"""decafa-fast: fused landmark-attention ops (spatial softmax, soft-argmax, attention mask, F1-F5 fusion)
for PyTorch on CPU (C++) and CUDA (Triton, CUDA C++), and the DeCaFA face-alignment model built on them."""
__version__ = "0.1.0"

from . import ops, reference  # noqa: E402,F401


def __getattr__(name: str):
    # FaceAligner pulls in OpenCV and the model: import it only when asked for (decafa_fast.FaceAligner).
    if name == "FaceAligner":
        from .aligner import FaceAligner

        return FaceAligner
    raise AttributeError(f"module 'decafa_fast' has no attribute {name!r}")
