"""`DecodeLinear`: an `nn.Linear` whose decode-sized CPU calls (a few rows, no autograd) run decoderkit's own GEMV.

At batch 1 a linear layer reads its whole weight for one row of products: MKL's sgemv reaches about 14 GB/s on
this project's AMD CPU, and bfloat16 weights go through a slow conversion path on a CPU without bf16 instructions.
`decoderkit.kernels.decode_linear` reads float32 or bfloat16 weights as they are, with float32 sums (see gemv.cpp).
Everything else (training, prefill, other devices, other dtypes) is `nn.Linear`'s own forward: the module keeps its
class's parameters, state-dict names and `isinstance(m, nn.Linear)`, so LoRA, quantization and saving see no change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows of x above which torch's GEMM (which reuses each weight tile across rows) is the faster choice
DECODE_ROWS = 4
_DTYPES = (torch.float32, torch.bfloat16)


class DecodeLinear(nn.Linear):
    """`nn.Linear`, with CPU inference calls of at most `DECODE_ROWS` rows through the decode GEMV kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from decoderkit.kernels import decode_linear

        if (x.device.type == "cpu" and not torch.is_grad_enabled() and x.numel() <= DECODE_ROWS * self.in_features
                and x.dtype in _DTYPES and self.weight.dtype in _DTYPES and self.weight.is_contiguous()):
            return decode_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_decode_linear(model: nn.Module) -> bool:
    """Turn every plain `nn.Linear` of a CPU `model` into a `DecodeLinear` (in place, weights untouched) when the
    kernel is available, and back when it is not (``DECODERKIT_KERNELS=0``); True if the model's linears now use it.
    Subclasses (LoRA, tensor-parallel) are left alone."""
    from decoderkit.kernels import decode_linear_available

    param = next(model.parameters(), None)
    enable = param is not None and param.device.type == "cpu" and decode_linear_available()
    found = False
    for module in model.modules():
        if enable and type(module) is nn.Linear and module.weight.dtype in _DTYPES:
            module.__class__ = DecodeLinear
        elif not enable and type(module) is DecodeLinear:
            module.__class__ = nn.Linear
        found = found or type(module) is DecodeLinear
    return found
