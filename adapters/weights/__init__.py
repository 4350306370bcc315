"""Checkpoint folders to torch modules: reading tensors, THUDM's quantised format, the quantised
layers, the streaming loader and the native CPU kernels.  Nothing here names a family."""
