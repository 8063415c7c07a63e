"""Triton kernels for the decafa ops, registered as decafa_triton::* through torch.library.triton_op.

    stats.py          per-(b, l) map kernels: softmax statistics / soft-argmax / Phi, and the logits backward
    fusion.py         per-(b, pixel tile) kernels: attention mask and F1-F5 fusion, forward and backward
    ops.py            the op bodies (allocation, launch configuration, batch chunking) and registration;
                      imported by decafa_fast.ops, which adds autograd. Launch parameters: ops.TUNING
    compile_check.py  compiles every kernel for sm_90 without a GPU and reports registers / spills
"""
