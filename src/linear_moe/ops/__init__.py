"""Functional LSM kernels with fla's names, signatures and `[B, T, H, D]` layout.

Each op returns `(o, final_state)` and takes `initial_state`, `output_final_state` and `cu_seqlens`.
On CUDA (with fla installed) it runs fla's Triton kernel; elsewhere our PyTorch implementation
(chunked matmul form for `chunk_*`, a token loop for `fused_recurrent_*` decoding).
"""
