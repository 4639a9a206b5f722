"""Paired initialisation: every parameter is drawn from a generator seeded by its own name.

Comparing a baseline with MoDA at one seed is only paired if the weights the two models share start
identical. Drawn from one global stream, they would not: MoDA's extra depth projections consume
random numbers in the middle of the stack, so every later layer of the two models differs. Seeding
each parameter from ``(base seed, qualified name)`` makes a parameter's initial value depend on its
name alone, whatever other modules a model has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from moda_lightning.norms import RMSNorm


def draw_base_seed() -> int:
    """One draw from torch's global generator: what ``seed_everything`` (or ``torch.manual_seed``) decides."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))  # not the meta device of a counting build


def parameter_seed(base_seed: int, name: str) -> int:
    """The seed of parameter ``name`` (e.g. ``layers.3.attn.sublayer.qkv_proj.weight``)."""
    digest = hashlib.sha256(f"{base_seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_parameters(model: nn.Module, base_seed: int, std_of: Callable[[str], float], *, truncated: bool) -> None:
    """Initialise ``model`` in place: RMSNorm gains 1, biases 0, every other weight (linear maps,
    embeddings) normal(0, ``std_of(name)``), truncated at 3 std if ``truncated``.

    Values are drawn on the CPU, so a model gets the same weights whatever device it is built on.
    Parameters on the meta device are left alone.
    """
    owner = {}
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            owner.setdefault(id(param), (module, attr))
    for name, param in model.named_parameters():  # tied weights come once, under their first name
        if param.is_meta:
            continue
        module, attr = owner[id(param)]
        with torch.no_grad():
            if isinstance(module, RMSNorm):
                param.fill_(1.0)
            elif attr == "bias":
                param.zero_()
            else:
                generator = torch.Generator().manual_seed(parameter_seed(base_seed, name))
                std = std_of(name)
                value = torch.empty(param.shape, dtype=torch.float32)
                if truncated:
                    nn.init.trunc_normal_(value, std=std, a=-3 * std, b=3 * std, generator=generator)
                else:
                    value.normal_(0.0, std, generator=generator)
                param.copy_(value)
