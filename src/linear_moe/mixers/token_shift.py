"""The RWKV-6/7 token shift, kept importable from here: the op is `linear_moe.ops.token_shift`."""

from linear_moe.ops.token_shift import token_shift

__all__ = ["token_shift"]
