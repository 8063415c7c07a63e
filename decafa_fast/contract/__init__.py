"""The op contract, shared by the reference and every backend: the fusion channel layout (`layout`), the op
table (`table`: every compiled op described once) and what derives from it, the schemas (`schemas`), the
fake kernels (`fakes`) and the C++ op list (`op_list`, which writes csrc/common/op_list.h).

A leaf of the import graph: its modules import torch and each other, nothing else of decafa_fast, so that
`decafa_fast.reference`, `decafa_fast.ops` and `decafa_fast.triton` can all depend on it without a cycle."""
