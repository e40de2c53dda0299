"""Functional LSM kernels with fla's names, signatures and `[B, T, H, D]` layout.

Each op returns `(o, final_state)` and takes `initial_state`, `output_final_state` and `cu_seqlens`.
On CUDA (with fla installed) it runs fla's Triton kernel; elsewhere our PyTorch implementation
(chunked matmul form for `chunk_*`, a token loop for `fused_recurrent_*` decoding). One dispatch
(`_dispatch.fla_dispatch`) builds every public op from its PyTorch form and the fla calls it may make;
`checks` holds the input checks the ops and the mixers share.

Shape letters (tensor names carry them as suffixes, `o_BTHV`, `U_BHNKV`):
    B  batch (1 for packed documents)          T  time: tokens per sequence (or total, packed)
    H  heads (HV: value heads under GVA)       K  key (and query) width per head
    V  value width per head                    D  model or channel width (conv, norm, HGRN: no heads)
    N  chunks within a sequence; in a state's shape `[N, H, K, V]`, the sequences (batch rows or documents)
    C  chunk length (tokens per chunk)
"""
