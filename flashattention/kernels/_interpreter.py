"""A fix for Triton's CPU interpreter (TRITON_INTERPRET=1), applied only when it is active.

The interpreter stores bfloat16 tensors as raw uint16 and its `tl.dot` multiplies those integers (seen in
triton 3.6 and 3.8), so any bf16 dot returns garbage. We widen bf16 operands to float32 first, which is
what the tensor cores compute with (bf16 products are exact in fp32). GPU compilation is untouched.
"""

from __future__ import annotations

import numpy as np


def patch_bf16_dot() -> None:
    from triton import language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_flashattention_bf16_fix", False):
        return
    original = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._flashattention_bf16_fix = True
    builder.create_dot = create_dot
