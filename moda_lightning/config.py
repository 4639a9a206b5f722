"""MoDAConfig: the architecture of a MoDA language model as plain data.

Names (backends, norm placements) are stored as registry keys, not classes, so that
``hparams.yaml`` and checkpoints stay plain data; ``plugins`` names the modules that register
keys of one's own. Every problem is reported in one error.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any


_CHOICES = {
    "depth_keys": ("writer", "reader"),
    "qk_norm_scope": ("head", "full"),
    "init_scheme": ("gpt2", "olmo2"),
}


@dataclass
class MoDAConfig:
    """Shapes and switches of a decoder-only MoDA LM (arXiv 2603.15619; docs/method.md, section 2)."""

    vocab_size: int
    """Token vocabulary size (follows the tokenizer)."""
    d_model: int = 256
    """Model width D."""
    n_layers: int = 4
    """Number of layers L (each: attention sublayer + SwiGLU FFN sublayer)."""
    n_heads: int = 4
    """Query heads Hq."""
    n_kv_heads: int = 2
    """Key/value heads Hk; Hq must be a multiple (G = Hq / Hk query heads share one KV head)."""
    head_dim: int | None = None
    """Head dimension d; default D / Hq."""
    ffn_hidden: int | None = None
    """SwiGLU hidden width; default 8/3 * D rounded up to a multiple of 64."""
    max_seq_len: int = 1024
    """Longest sequence the model accepts (size of the rotary table)."""
    plugins: list[str] = field(default_factory=list)
    """Python modules imported before the model is built, so that the attention backends and norm
    placements they register are selectable by key (``--model.plugins='[my_pkg.backends]'``)."""
    attention: str = "moda_torch"
    """Key of a registered attention backend (``moda_lightning.attention.registered_backends()``)."""
    norm: str = "pre"
    """Key of a registered norm placement (``moda_lightning.norms.registered_norms()``)."""
    depth_kv: bool | None = None
    """Write each attention sublayer's K/V to the depth stream (default: on for backends that read depth)."""
    ffn_kv: bool | None = None
    """Project each FFN input into an extra depth K/V slot (default: on for backends that read depth)."""
    attn_kv_proj: bool = False
    """Give the attention's depth slot its own K/V projection instead of reusing sequence K/V."""
    depth_keys: str = "writer"
    """What a depth slot's key is. 'writer': the key exactly as its sublayer used it (after that
    sublayer's key norm and RoPE at its own token). 'reader': the sublayer's pre-norm, pre-RoPE key;
    the reading layer applies its own key norm and no rotation (see docs/method.md)."""
    qk_norm: bool = True
    """RMSNorm on queries and keys before RoPE, as in OLMo2."""
    qk_norm_scope: str = "head"
    """What one QK norm spans: 'head' (each head's d channels, one d-wide gain shared by the heads) or
    'full' (the whole Hq*d or Hk*d projection, one gain per channel, as OLMo2 does)."""
    linear_bias: bool = False
    """Biases on every linear map but the LM head (the paper's models have none)."""
    last_layer_depth_proj: bool = False
    """Give the last layer depth K/V projections too. No layer reads its slots, so their weights are
    frozen (requires_grad=False) and never train; only for matching parameter counts that include them."""
    tie_embeddings: bool = False
    """Share the token embedding with the output projection."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    init_scheme: str = "gpt2"
    """'gpt2': normal(0, init_std), the residual output projections scaled by 1/sqrt(2L); 'olmo2':
    normal(0, init_std) truncated at 3 std, no scaling. Either way each parameter is drawn from a
    generator seeded by its name, so models that share a parameter start it identical."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them."""

    def __post_init__(self) -> None:
        # Plugins first: the keys they register are checked below.
        problems = self._import_plugins()
        # Registries are imported here, not at module top, to keep this module plain data.
        from moda_lightning.attention import backend_class, registered_backends
        from moda_lightning.norms import norm_class

        reads_depth = True
        try:
            reads_depth = backend_class(self.attention).reads_depth
        except ValueError as err:  # unknown backend: the message lists the registered ones
            problems.append(str(err))
        try:
            norm_class(self.norm)
        except ValueError as err:
            problems.append(str(err))
        if self.depth_kv is None:
            self.depth_kv = reads_depth
        if self.ffn_kv is None:
            self.ffn_kv = reads_depth
        if not reads_depth:
            wanted = [name for name in ("depth_kv", "ffn_kv", "attn_kv_proj") if getattr(self, name)]
            if wanted:
                one = len(wanted) == 1
                problems.append(
                    f"attention backend {self.attention!r} reads no depth stream, but {', '.join(wanted)} "
                    f"{'is' if one else 'are'} on. Use a backend that reads it (--model.attention=NAME, NAME in "
                    f"{registered_backends(reads_depth=True)}) or turn {'it' if one else 'them'} off "
                    + " ".join(f"(--model.{name}=false)" for name in wanted)
                    + "."
                )
        if self.attn_kv_proj and not self.depth_kv:
            problems.append(
                "attn_kv_proj=true gives the attention's depth slot its own K/V projection, so it needs "
                "depth_kv=true; set --model.depth_kv=true or --model.attn_kv_proj=false."
            )
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer; got {getattr(self, name)}.")
        if self.n_heads >= 1 and self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads:
            problems.append(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; each KV head serves "
                f"n_heads / n_kv_heads query heads. Choose n_kv_heads among "
                f"{[h for h in range(1, self.n_heads + 1) if self.n_heads % h == 0]}."
            )
        if self.head_dim is None and self.n_heads >= 1 and self.d_model % self.n_heads:
            problems.append(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}, so the head size is not "
                "an integer; change one of them or set head_dim explicitly."
            )
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            problems.append(f"head_dim must be an even number >= 2 for rotary embeddings; got {self.head_dim}.")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r}; expected one of {list(allowed)} (--model.{name}=...).")
        if self.last_layer_depth_proj and not reads_depth:
            problems.append(
                f"last_layer_depth_proj=true adds depth projections, but backend {self.attention!r} reads no depth; "
                "turn it off (--model.last_layer_depth_proj=false)."
            )
        if problems:
            raise ValueError("invalid MoDA model configuration:\n  - " + "\n  - ".join(problems))
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads
            if self.head_dim % 2:
                raise ValueError(
                    f"invalid MoDA model configuration: head size d_model / n_heads = {self.head_dim} is odd, "
                    "but rotary embeddings need an even head size; change d_model or n_heads."
                )
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * -(-(8 * self.d_model // 3) // 64)

    def _import_plugins(self) -> list[str]:
        """Import every module of ``plugins`` (importing registers its keys); one problem line per failure."""
        if self.plugins is None:  # the LightningModule's default, passed through: no plugins
            self.plugins = []
        names_ok = isinstance(self.plugins, (list, tuple)) and all(isinstance(n, str) and n for n in self.plugins)
        if not names_ok:
            return [
                f"plugins must be a list of module names such as ['my_pkg.backends']; got {self.plugins!r}. "
                "On the command line: --model.plugins='[my_pkg.backends]'."
            ]
        self.plugins = list(self.plugins)  # stored as a plain list, whatever sequence came in
        problems = []
        for name in self.plugins:
            try:
                importlib.import_module(name)
            except ImportError as err:
                problems.append(
                    f"plugin module {name!r} could not be imported ({type(err).__name__}: {err}); check that it is "
                    "installed or that the folder above its package is on PYTHONPATH, and that it is written as a "
                    "module path (my_pkg.backends), not a file path."
                )
        return problems

    @property
    def group_size(self) -> int:
        """G: query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def slots_per_layer(self) -> int:
        """Depth slots each layer writes: its attention K/V and/or its FFN K/V."""
        return int(bool(self.depth_kv)) + int(bool(self.ffn_kv))

    @property
    def reads_depth(self) -> bool:
        """Whether any layer attends to a depth slot."""
        return self.slots_per_layer > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides: Any) -> MoDAConfig:
        """The config held in a larger mapping: a run's ``hparams.yaml``, or the ``model:`` section
        of a resolved ``moda fit`` config. Keys that are not fields are ignored, and ``None`` means
        the field's default (as the LightningModule's arguments do)."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names and v is not None}
        return cls(**{**kwargs, **overrides})
