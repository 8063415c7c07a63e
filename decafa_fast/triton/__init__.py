"""Triton kernels for the decafa ops, registered as decafa_triton::* through torch.library.triton_op."""
