"""The public MoDA attention op: one signature, two backends named like the model's.

``moda_attention`` is what other projects call; the model's attention backends
(``moda_lightning.attention``) are thin adapters over it, and its ``backend=`` keys are theirs:
``"moda_torch"`` runs ``moda_attn_reference`` (vectorized PyTorch, the definition of the op) and
``"moda_triton"`` runs the fused kernel ``moda_attn``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from moda_kernels.moda_attn import check_moda_inputs, moda_attn_reference
from moda_kernels.moda_attn.grad_into import GradInto, add_grad_into
from moda_lightning.registry import Registry

_Op = Callable[..., Tensor | tuple[Tensor, Tensor, Tensor]]

# Each entry returns the op on first use, so that `import moda_lightning` never imports Triton.
_OP_BACKENDS: Registry[Callable[[], _Op]] = Registry("backend", "Pass one of them as backend=NAME.")


@_OP_BACKENDS.register("moda_torch")
def _moda_torch_op() -> _Op:
    return moda_attn_reference


@_OP_BACKENDS.register("moda_triton")
def _moda_triton_op() -> _Op:
    from moda_kernels.moda_attn import moda_attn

    return moda_attn


_RENAMED = {"reference": "moda_torch", "triton": "moda_triton"}


def moda_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    depth_k: Tensor | None = None,
    depth_v: Tensor | None = None,
    *,
    num_depth: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "moda_torch",
    return_lse: bool = False,
    depth_grad_into: GradInto | None = None,
    q_depth: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Mixture-of-Depths attention: sequence and depth keys under one softmax.

    Query head ``h`` of token ``t`` attends to the sequence keys ``k[j]`` (``j <= t`` when
    causal) and to the first ``num_depth`` depth slots of its own token,
    ``depth_k[t, :num_depth]``, with one softmax over both; query head ``h`` reads KV
    head ``h // (Hq // Hk)`` (grouped-query attention). The depth logits may use a query of
    their own, ``q_depth``: a reader that puts a per-channel gain ``g`` on every slot it reads
    passes ``q * g`` there, since ``(q * g) . k_s = q . (k_s * g)``, instead of copying the slots.

    Args:
        q: queries ``[B, T, Hq, d]``.
        k, v: sequence keys and values ``[B, T, Hk, d]``.
        depth_k, depth_v: the depth stream ``[B, T, S, Hk, d]`` (any strides), or lists of ``S``
            slots ``[B, T, Hk, d]`` read whole (the functional form ``torch.compile`` traces; the
            fused kernel takes contiguous slots), or ``None``.
        num_depth: how many of the ``S`` slots are read (default: all of them).
        causal: mask sequence keys after the query's token.
        scale: logit scale, default ``d ** -0.5``.
        backend: the model's attention backend key: ``"moda_torch"`` (default; runs
            ``moda_attn_reference``: vectorized PyTorch, any device, fp32/bf16/fp16) or
            ``"moda_triton"`` (runs the fused kernel ``moda_attn``, CUDA only).
        return_lse: also return the log-sum-exp of each row and of its depth part.
        depth_grad_into: two tensors shaped like ``depth_k`` (keys, values), or a function
            returning them that is called in backward, into which the backward *adds* the depth
            gradients instead of returning them to ``depth_k`` and ``depth_v``. For callers that
            sum many readers' gradients of one buffer, as the model's depth stream does; the
            Triton backend fuses the add into its kernel.
        q_depth: ``[B, T, Hq, d]`` like ``q``: the query of the depth logits (default: ``q``).
            The sequence logits keep ``q``; ``q`` gets the sequence part of the query gradient
            and ``q_depth`` the depth part.
        key_mask: bool ``[B, Tk]``: keys no query may attend are False (left-padded prompts).
            With it, or with ``k, v`` longer than ``q`` (decoding: the queries are the last ``T`` of
            ``Tk`` positions and the depth slots are the query tokens' own), ``moda_triton`` runs its
            forward-only decode kernels (no gradients: call it under ``torch.no_grad()``).

    Returns:
        ``o [B, T, Hq, d]``; with ``return_lse=True`` the tuple ``(o, lse, lse_depth)``,
        both ``[B, T, Hq]`` natural-log; ``exp(lse_depth - lse)`` is the row's depth mass.

    Raises:
        ValueError: on inconsistent shapes or an unknown backend.
    """
    if backend in _RENAMED:
        raise ValueError(
            f"moda_attention: backend {backend!r} was renamed to {_RENAMED[backend]!r}, the key of the same "
            f"path as a model attention backend; pass backend={_RENAMED[backend]!r}."
        )
    try:
        op = _OP_BACKENDS.get(backend)()
    except ValueError as err:
        raise ValueError(f"moda_attention: {err}") from None
    kwargs = dict(num_depth=num_depth, causal=causal, scale=scale, return_lse=return_lse)
    if backend == "moda_triton":  # validates its inputs itself: once per call is enough on a hot path
        return op(q, k, v, depth_k, depth_v, **kwargs, depth_grad_into=depth_grad_into, q_depth=q_depth, key_mask=key_mask)
    kwargs["num_depth"] = check_moda_inputs(
        q, k, v, depth_k, depth_v, num_depth, q_depth, queries_may_be_fewer=True, key_mask=key_mask
    )
    kwargs["key_mask"] = key_mask
    if depth_grad_into is not None and isinstance(depth_k, (list, tuple)):
        raise ValueError(
            "moda_attention: depth_grad_into adds into a [B, T, S, Hk, d] buffer; slots passed as lists get "
            "their gradients through autograd: drop depth_grad_into or pass the stream as one tensor."
        )
    if depth_grad_into is not None and depth_k is not None and depth_v is not None:
        depth_k, depth_v = add_grad_into(depth_k, depth_v, depth_grad_into)
    return op(q, k, v, depth_k, depth_v, **kwargs, q_depth=q_depth)
