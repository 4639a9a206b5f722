"""Kernel tests: on a machine without CUDA, run the Triton kernels under the interpreter.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it is set here,
before any test module of this folder imports ``moda_kernels.moda_attn.function``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
