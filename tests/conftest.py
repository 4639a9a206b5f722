"""Test-wide setup.

On a machine without CUDA the Triton kernels run under Triton's interpreter. Triton reads
``TRITON_INTERPRET`` when a ``@triton.jit`` function is defined, including Triton's own
library functions defined when ``triton.language`` is first imported (Lightning and torch
may import it during collection), so it must be set before any test module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
