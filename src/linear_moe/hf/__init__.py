"""Hugging Face interoperability: export a checkpoint to a transformers directory, import it back, and build a
Linear-MoE model from a pretrained Hugging Face MoE (Qwen2-MoE, Mixtral, DeepSeek-V2). See docs/hf.md.

    export_hf(checkpoint, out)        checkpoint -> config.json, model.safetensors, tokenizer, modeling code
    save_hf(model, out, tokenizer)    the same from a model in memory
    import_hf(hf_dir, out)            such a directory -> a checkpoint directory (round trip exact)
    linearise(model, hf_dir)          copy / map a pretrained MoE's weights into a built model -> `InitReport`
    model_config_from_hf(hf_dir, base)  the `ModelConfig` that fits a pretrained MoE (the mixer choice from `base`)

Only the loading side (`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`) needs transformers
(`pip install linear-moe[hf]`); conversions read and write safetensors and JSON directly.
"""

from __future__ import annotations

from linear_moe.hf.convert import HFError, export_hf, import_hf, load_checkpoint_model, save_hf
from linear_moe.hf.linearise import (
    ARCHITECTURES,
    InitReport,
    check_vocab,
    linearise,
    model_config_from_hf,
    run_config_from_hf,
)

__all__ = [
    "ARCHITECTURES",
    "HFError",
    "InitReport",
    "check_vocab",
    "export_hf",
    "import_hf",
    "linearise",
    "load_checkpoint_model",
    "model_config_from_hf",
    "run_config_from_hf",
    "save_hf",
]
