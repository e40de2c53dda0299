"""Building blocks shared by the model, the mixers and the MoE layers: `norm` (RMSNorm, GatedRMSNorm), `conv`
(ShortConvolution), `mlp` (SwiGLU). Each module is imported by path; this package re-exports nothing so that
importing one block stays light."""
