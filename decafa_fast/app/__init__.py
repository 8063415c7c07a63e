"""The face-alignment application built on the op library: the DeCaFA model (`model`), face data sets and
synthetic faces (`data`), training (`training`), evaluation and metrics (`evaluation`), landmarks for photos
and video (`prediction`), ONNX export (`export`) and the `decafa-fast` command line (`cli`).

It imports `decafa_fast.ops`; nothing under `decafa_fast.ops`, `reference`, `nn` or `triton` imports it."""
