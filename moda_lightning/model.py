"""The MoDA decoder-only language model as a plain ``nn.Module`` (no Lightning).

Read it next to docs/method.md, section 2: every layer has an attention and a SwiGLU FFN
sublayer; each attention reads the depth slots written by the layers above it, then
writes its own K/V; each FFN may write a K/V projected from its input.
"""

from __future__ import annotations

import importlib.util
import math
import re
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moda_lightning.attention import AttentionBackend, build_backend
from moda_lightning.config import MoDAConfig
from moda_lightning.depth_slots import DepthSlots, trace_checkpointed_writes
from moda_lightning.depth_stream import DepthStream, run_eagerly_under_compile
from moda_lightning.generation.kv_cache import KVCache, LayerCache
from moda_lightning.init import draw_base_seed, init_parameters
from moda_lightning.norms import QKNorm, RMSNorm, norm_class, unit_rms


class RotaryEmbedding(nn.Module):
    """RoPE on ``[B, T, H, d]`` tensors: position ``t`` rotates each pair of channels by ``t * theta_i``.

    Channel ``i`` pairs with ``i + d/2``; written as ``x * cos + [x2, x1] * sin`` with the sine
    negated on the first half, which is three kernels instead of six.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [T_max, d/2]
        # Not persistent: recomputed from the config, so checkpoints stay small and portable.
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], dim=-1), persistent=False)
        self._tables_in: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    def _apply(self, fn, recurse=True):  # .to() / .cuda() move the buffers: drop their casts
        self._tables_in = {}
        return super()._apply(fn, recurse)

    def tables(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos, sin [T_max, d]`` in ``dtype``, cast once (a bf16 run would otherwise cast per call)."""
        if torch.compiler.is_compiling():  # the compiled graph fuses the cast anyway
            return self.cos.to(dtype), self.sin.to(dtype)
        if dtype not in self._tables_in:
            self._tables_in[dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        return self._tables_in[dtype]

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """``x [B, T, H, d]`` rotated at positions ``0..T-1``, or at ``positions [B, T]`` (decoding
        after a cache, or left-padded prompts whose rows start at different offsets)."""
        cos, sin = self.tables(x.dtype)
        if positions is None:
            T = x.shape[1]
            cos, sin = cos[:T, None, :], sin[:T, None, :]
        else:
            cos, sin = cos[positions][:, :, None, :], sin[positions][:, :, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([x2, x1], dim=-1) * sin


@cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _fused_norm_kernels_apply(x: Tensor) -> bool:
    """Whether a per-head norm of ``x [B, T, H, d]`` may run as a ``moda_kernels.norm_rope`` kernel:
    on CUDA, eagerly (``torch.compile`` fuses the plain ops itself), d a power of two, Triton installed."""
    return x.is_cuda and x.shape[-1] & (x.shape[-1] - 1) == 0 and not torch.compiler.is_compiling() and _has_triton()


def norm_then_rope(x: Tensor, norm: nn.Module, rope: RotaryEmbedding, positions: Tensor | None = None) -> Tensor:
    """``rope(norm(x))`` for per-head queries and keys ``[B, T, H, d]``.

    On CUDA with an RMSNorm this is one fused Triton kernel each way (``moda_kernels.norm_rope``)
    instead of about seven elementwise ones: the same math, rounded once. Elsewhere, under
    ``torch.compile`` (which fuses the plain ops itself) and for sharded parameter types, it is
    the two modules; also at explicit ``positions`` (decoding), which the kernel does not take.
    """
    fused = (
        positions is None
        and isinstance(norm, RMSNorm)
        and not getattr(norm, "spans_heads", False)  # the kernel normalises one head at a time
        and type(norm.weight) is nn.Parameter  # not a DTensor shard: the kernel reads plain memory
        and _fused_norm_kernels_apply(x)
    )
    if fused:
        from moda_kernels.norm_rope import norm_rope

        cos, sin = rope.tables(torch.float32)  # the buffers themselves, unless the model was cast
        return norm_rope(x, norm.weight, cos, sin, norm.eps)
    return rope(norm(x), positions)


def qk_norm(config: MoDAConfig, n_heads: int) -> nn.Module:
    """The query or key norm of ``n_heads`` heads as configured (``qk_norm``, ``qk_norm_scope``)."""
    return QKNorm(n_heads, config.head_dim, config.qk_norm_scope, config.norm_eps) if config.qk_norm else nn.Identity()


def reader_slot_key(k: Tensor, config: MoDAConfig) -> Tensor:
    """A slot key under ``depth_keys="reader"``: the raw key divided by its RMS, no gain, no rotation.

    The reading layer's key norm is ``unit_rms(k) * gain``; the first factor is the same for every
    reader, so the writer stores it once, and each reader puts its own gain on its query instead
    (``q_depth``): no per-layer copy of the slots.
    """
    if not config.qk_norm:
        return k
    spans_heads = config.qk_norm_scope == "full"
    if not spans_heads and _fused_norm_kernels_apply(k):
        from moda_kernels.norm_rope import unit_rms as unit_rms_kernel

        # one kernel each way where casts, the norm and casts back took three (each slot, every step)
        return unit_rms_kernel(k, config.norm_eps)
    return unit_rms(k, spans_heads, config.norm_eps)


class DepthKVProjection(nn.Module):
    """Maps ``D -> Hk*d`` (keys and values, one matmul) that turn a sublayer's input into one depth slot.

    ``depth_keys="writer"``: the key gets the same norm as sequence keys and the rotary phase of its
    own token, so that the query (rotated at ``t``) meets it at relative position zero.
    ``depth_keys="reader"``: the key is stored unrotated at unit RMS (:func:`reader_slot_key`).
    """

    def __init__(self, config: MoDAConfig) -> None:
        super().__init__()
        self.config = config
        self.n_kv_heads, self.head_dim = config.n_kv_heads, config.head_dim
        self.kv_proj = nn.Linear(config.d_model, 2 * config.n_kv_heads * config.head_dim, bias=config.linear_bias)
        self.k_norm = qk_norm(config, config.n_kv_heads) if config.depth_keys == "writer" else None

    def forward(self, h: Tensor, rope: RotaryEmbedding, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, T, _ = h.shape
        k, v = self.kv_proj(h).view(B, T, 2, self.n_kv_heads, self.head_dim).unbind(dim=2)
        if self.k_norm is None:
            return reader_slot_key(k, self.config), v
        return norm_then_rope(k, self.k_norm, rope, positions), v


class MoDAAttention(nn.Module):
    """Grouped-query attention over ``[sequence | depth]`` keys; writes its K/V to the depth stream.

    ``has_depth_proj`` builds the attention's own depth projection (``attn_kv_proj``) even where
    ``writes_depth`` is off (``last_layer_depth_proj``): it then exists, for parameter counts, but
    is never called.
    """

    def __init__(self, config: MoDAConfig, backend: AttentionBackend, writes_depth: bool, has_depth_proj: bool) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        D, d = config.d_model, config.head_dim
        # q, k and v in one matmul: one launch instead of three, forward and backward
        self.qkv_split = [config.n_heads * d, config.n_kv_heads * d, config.n_kv_heads * d]
        self.qkv_proj = nn.Linear(D, sum(self.qkv_split), bias=config.linear_bias)
        self.o_proj = nn.Linear(config.n_heads * d, D, bias=config.linear_bias)
        self.q_norm = qk_norm(config, config.n_heads)
        self.k_norm = qk_norm(config, config.n_kv_heads)
        self.writes_depth = writes_depth and bool(config.depth_kv)
        # Table 3 row 5: the depth slot gets its own projection instead of reusing k, v.
        wants_proj = bool(config.depth_kv) and config.attn_kv_proj and has_depth_proj
        self.depth_kv_proj = DepthKVProjection(config) if wants_proj else None
        self.reader_keys = config.depth_keys == "reader"

    def forward(
        self,
        h: Tensor,
        *,
        rope: RotaryEmbedding,
        depth: DepthStream | DepthSlots | None,
        positions: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        B, T, _ = h.shape
        q, k_raw, v = self.qkv_proj(h).split(self.qkv_split, dim=-1)
        q = norm_then_rope(q.view(B, T, self.n_heads, self.head_dim), self.q_norm, rope, positions)
        k_raw = k_raw.view(B, T, self.n_kv_heads, self.head_dim)
        k = norm_then_rope(k_raw, self.k_norm, rope, positions)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        # Decoding: the sequence keys are every cached position plus these; depth stays per token.
        seq_k, seq_v, key_mask = cache.extend(k, v) if cache is not None else (k, v, None)

        # Read the slots of the layers above before writing this layer's own.
        depth_k, depth_v, num_depth = depth.read() if depth is not None else (None, None, 0)
        extra = {}
        if num_depth and self.reader_keys and isinstance(self.k_norm, QKNorm):
            # this layer's key-norm gain on the unit-RMS slots, carried by the query of the depth logits
            extra["q_depth"] = q * self.k_norm.gain_per_head(self.n_heads).to(q.dtype)
        # The backward kernel adds this read's slot gradients straight into the stream's gradient
        # buffer or per-slot sums; a buffer stream's methods run eagerly, so not inside a compiled graph.
        eager_or_slots = isinstance(depth, DepthSlots) or not torch.compiler.is_compiling()
        if num_depth and getattr(self.backend, "takes_depth_grad_into", False) and eager_or_slots:
            extra["depth_grad_into"] = depth.grad_buffers(num_depth)
        if key_mask is not None:
            extra["key_mask"] = key_mask
        o = self.backend(q, seq_k, seq_v, depth_k, depth_v, num_depth=num_depth, **extra)

        if depth is not None and self.writes_depth:
            if self.depth_kv_proj is not None:
                depth.append(*self.depth_kv_proj(h, rope, positions))
            else:
                depth.append(reader_slot_key(k_raw, self.config) if self.reader_keys else k, v)
        return self.o_proj(o.reshape(B, T, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    """``W_down(silu(W_gate h) * W_up h)``; with ``ffn_kv`` its input also becomes a depth slot."""

    def __init__(self, config: MoDAConfig, writes_depth: bool, has_depth_proj: bool) -> None:
        super().__init__()
        bias = config.linear_bias
        self.w_gate_up = nn.Linear(config.d_model, 2 * config.ffn_hidden, bias=bias)  # W_gate and W_up, one matmul
        self.w_down = nn.Linear(config.ffn_hidden, config.d_model, bias=bias)
        self.depth_kv_proj = DepthKVProjection(config) if has_depth_proj and config.ffn_kv else None
        self.writes_depth = writes_depth

    def forward(
        self, h: Tensor, *, rope: RotaryEmbedding, depth: DepthStream | DepthSlots | None, positions: Tensor | None = None
    ) -> Tensor:
        if depth is not None and self.depth_kv_proj is not None and self.writes_depth:
            depth.append(*self.depth_kv_proj(h, rope, positions))
        gate, up = self.w_gate_up(h).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class MoDABlock(nn.Module):
    """One layer: attention then FFN, each wrapped in the configured norm placement.

    ``writes_depth`` is off for the last layer: no layer below reads its slots, so it gets
    no depth projections (the paper's Table 3 parameter counts show the same: L - 1 layers),
    unless ``last_layer_depth_proj`` asks for them anyway (Table 6's counts include them).
    """

    def __init__(self, config: MoDAConfig, backend: AttentionBackend, writes_depth: bool = True) -> None:
        super().__init__()
        placement = norm_class(config.norm)
        has_proj = writes_depth or config.last_layer_depth_proj
        self.attn = placement(config.d_model, MoDAAttention(config, backend, writes_depth, has_proj), config.norm_eps)
        self.ffn = placement(config.d_model, SwiGLU(config, writes_depth, has_proj), config.norm_eps)

    def forward(
        self,
        x: Tensor,
        *,
        rope: RotaryEmbedding,
        depth: DepthStream | DepthSlots | None,
        positions: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        if cache is None:  # training: the plain call, as activation checkpointing replays it
            x = self.attn(x, rope=rope, depth=depth)
            return self.ffn(x, rope=rope, depth=depth)
        x = self.attn(x, rope=rope, depth=depth, positions=positions, cache=cache)
        return self.ffn(x, rope=rope, depth=depth, positions=positions)


class MoDATransformer(nn.Module):
    """Token ids ``[B, T]`` to next-token logits ``[B, T, vocab_size]``."""

    def __init__(self, config: MoDAConfig) -> None:
        super().__init__()
        self.config = config
        # Drawn first, before any module is built: the one number of torch's global stream the weights depend on.
        self.init_seed = draw_base_seed()
        backend = build_backend(config.attention)
        self.backend = backend
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            MoDABlock(config, backend, writes_depth=layer < config.n_layers - 1) for layer in range(config.n_layers)
        )
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.reset_parameters()
        if config.reads_depth and not backend.reads_slot_lists:
            run_eagerly_under_compile()
        elif config.reads_depth and config.activation_checkpointing:
            trace_checkpointed_writes()
        if config.last_layer_depth_proj:
            # No layer reads the last layer's slots: its projections would never get a gradient,
            # which DDP reports as an error. Frozen, they still count as parameters.
            for sublayer in (self.layers[-1].attn.sublayer, self.layers[-1].ffn.sublayer):
                if sublayer.depth_kv_proj is not None:
                    sublayer.depth_kv_proj.requires_grad_(False)

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, each from a generator seeded by its name (paired
        initialisation, ``moda_lightning/init.py``). ``init_scheme="gpt2"``: the projections that
        write into the residual stream get std / sqrt(2L); ``"olmo2"``: truncated at 3 std, unscaled."""
        std, gpt2 = self.config.init_std, self.config.init_scheme == "gpt2"
        residual_out = re.compile(r"layers\.\d+\.(attn\.sublayer\.o_proj|ffn\.sublayer\.w_down)\.weight")
        scaled = std / math.sqrt(2 * self.config.n_layers)

        def std_of(name: str) -> float:
            return scaled if gpt2 and residual_out.fullmatch(name) else std

        init_parameters(self, self.init_seed, std_of, truncated=not gpt2)

    def forward(
        self,
        idx: Tensor,
        *,
        cache: KVCache | None = None,
        token_mask: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
    ) -> Tensor:
        """Logits ``[B, T, vocab]`` for token ids ``[B, T]``; with ``logits_to_keep`` N > 0, those of
        the last N positions only (a 1-D tensor: of those positions), since a prompt pass needs the
        last token's alone and the full table is ``T x vocab`` per row.

        With ``cache`` (decoding, :mod:`moda_lightning.generation`), ``idx`` continues the cached
        tokens: its keys and values are appended to the cache and attend to every cached position;
        ``token_mask [B, T]`` marks padding (False) that no later token may attend.
        """
        B, T = idx.shape
        if isinstance(logits_to_keep, int) and logits_to_keep < 0:
            raise ValueError(f"logits_to_keep={logits_to_keep}: pass 0 for every position or N > 0 for the last N")
        if cache is not None:
            return self._forward_cached(idx, cache, token_mask, logits_to_keep)
        if T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {T} tokens is longer than the model's max_seq_len={self.config.max_seq_len}; "
                f"lower --data.seq_len to at most {self.config.max_seq_len} or raise --model.max_seq_len."
            )
        self.backend.check_device(idx.device.type)
        n_slots = (self.config.n_layers - 1) * self.config.slots_per_layer
        depth = self._new_depth_stream(n_slots) if self.config.reads_depth else None
        x = self.embed(idx)
        for layer, block in enumerate(self.layers):
            if self.config.activation_checkpointing and torch.is_grad_enabled():
                first_slot = layer * self.config.slots_per_layer
                x = checkpoint(self._replayable_block, block, x, depth, first_slot, use_reentrant=False)
            else:
                x = block(x, rope=self.rope, depth=depth)
        return self._logits(x, logits_to_keep)

    def _logits(self, x: Tensor, keep: int | Tensor) -> Tensor:
        if isinstance(keep, Tensor):
            x = x[:, keep]
        elif keep:
            x = x[:, -keep:]
        return self.lm_head(self.final_norm(x))

    def _forward_cached(
        self, idx: Tensor, cache: KVCache, token_mask: Tensor | None, logits_to_keep: int | Tensor
    ) -> Tensor:
        self.backend.check_device(idx.device.type)
        positions = cache.begin(idx.shape[1], token_mask)
        n_slots = (self.config.n_layers - 1) * self.config.slots_per_layer
        # A token's depth slots are its own: each call starts a fresh stream for its new tokens.
        depth = self._new_depth_stream(n_slots) if self.config.reads_depth else None
        x = self.embed(idx)
        for layer, block in enumerate(self.layers):
            x = block(x, rope=self.rope, depth=depth, positions=positions, cache=cache.layer(layer))
        cache.commit(idx.shape[1])
        return self._logits(x, logits_to_keep)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, **sampling) -> list[list[int]]:
        """Continue each prompt (token ids; lengths may differ) by up to ``max_new_tokens`` tokens
        with a KV cache; ``sampling`` is :func:`moda_lightning.generation.generate`'s options
        (temperature, top_k, top_p, eos_id, generator)."""
        from moda_lightning.generation import generate

        return generate(self, prompts, max_new_tokens, **sampling)

    def _new_depth_stream(self, n_slots: int) -> DepthStream | DepthSlots:
        """The list of slots (``moda_lightning/depth_slots.py``), which ``torch.compile`` traces as one
        graph, for backends that read it; the buffer stream for the others, and for the fused kernel
        in eager mode, whose backward adds every read's slot gradients into the buffer."""
        fused_eager = self.backend.takes_depth_grad_into and not torch.compiler.is_compiling()
        if self.backend.reads_slot_lists and not fused_eager:
            return DepthSlots(n_slots, sum_gradients=self.backend.takes_depth_grad_into)
        return DepthStream(n_slots)

    def _replayable_block(self, block: MoDABlock, x: Tensor, depth: DepthStream | DepthSlots | None, first_slot: int) -> Tensor:
        # The recomputation in backward replays the block's depth writes: it rewinds the
        # stream to the block's first slot and writes the same values again.
        if depth is not None:
            depth.seek(first_slot)
        return block(x, rope=self.rope, depth=depth)

    def num_parameters(self) -> int:
        """Trainable parameters, tied weights counted once."""
        return sum(p.numel() for p in self.parameters())
