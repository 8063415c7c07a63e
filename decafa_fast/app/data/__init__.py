"""Data: markup layouts, synthetic faces, augmentations (real-data readers live beside them)."""
from .markups import MARKUPS, Markup, derive_from_wflw98, get_markup
from .synthetic import ALL_MARKUPS, SyntheticFaces, collate_faces, generate_face

__all__ = [
    "ALL_MARKUPS",
    "MARKUPS",
    "Markup",
    "SyntheticFaces",
    "collate_faces",
    "derive_from_wflw98",
    "generate_face",
    "get_markup",
]
