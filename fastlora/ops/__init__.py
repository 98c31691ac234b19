"""The op contract: every op with kernels of its own as a torch.library custom op (schema + fake
implementation) with one kernel per backend, and a Python entry point that validates arguments and picks
the backend. ``frozen_linear`` has no kernel of its own (fp32 torch GEMMs over blocks of a bf16 weight): it
is an autograd function of torch ops, which torch.compile and FakeTensorMode trace as they are."""

from .dequantize_4bit import dequantize_4bit
from .dequantize_4bit_into import dequantize_4bit_into
from .dequantize_absmax import dequantize_absmax
from .dora_linear import dora_linear
from .frozen_linear import frozen_linear
from .linear_4bit import linear_4bit
from .lora_branch import lora_branch
from .lora_dropout import lora_dropout
from .lora_gated_mlp import lora_gated_mlp
from .lora_linear import lora_linear
from .lora_projection import LoraProjection
from .lora_qkv import lora_qkv
from .neftune_embedding import neftune_embedding
from .quantize_4bit import quantize_4bit
from .quantize_absmax import quantize_absmax

__all__ = [
    "LoraProjection", "dequantize_4bit", "dequantize_4bit_into", "dequantize_absmax", "dora_linear", "frozen_linear",
    "linear_4bit",
    "lora_branch", "lora_dropout", "lora_gated_mlp", "lora_linear", "lora_qkv", "neftune_embedding", "quantize_4bit",
    "quantize_absmax",
]
