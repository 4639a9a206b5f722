"""The attention-backend and norm-placement registries, and plugins that add to them from the config.

The plugin module is ``tests.plugins.toy_backend``: a module path from the repository root, the
way a user names a module of their own project. ``tests/`` has no ``__init__.py`` (pytest imports
the test files by their folder), so ``tests`` resolves as a namespace package once the repository
root is on ``sys.path``; the ``repo_on_path`` fixture makes sure it is, whether pytest was started
as ``python -m pytest`` (which adds the working directory) or as the ``pytest`` script (which
does not).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from moda_lightning.attention import AttentionBackend, _BACKENDS, register_backend, registered_backends
from moda_lightning.config import MoDAConfig
from moda_lightning.model import MoDATransformer
from moda_lightning.norms import _NORMS, NormPlacement, PostNorm, PreNorm, norm_class, register_norm, registered_norms
from moda_lightning.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "tests.plugins.toy_backend"
TINY = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16)


@pytest.fixture(autouse=True)
def repo_on_path(monkeypatch):
    if str(REPO_ROOT) not in sys.path:
        monkeypatch.syspath_prepend(str(REPO_ROOT))


# ----------------------------------------------------------------------------- the registries


def test_builtin_keys_are_registered():
    assert {"pre", "post", "olmo2"} <= set(registered_norms())
    assert norm_class("pre") is PreNorm and norm_class("post") is PostNorm
    assert "sdpa" in registered_backends(reads_depth=False) and "sdpa" not in registered_backends(reads_depth=True)
    assert {"moda_torch", "moda_triton"} <= set(registered_backends(reads_depth=True))


def test_unknown_norm_names_the_registered_ones_and_the_closest():
    with pytest.raises(ValueError) as err:
        norm_class("psot")
    assert str(err.value) == (
        f"unknown norm placement 'psot'; registered: {registered_norms()} (did you mean 'post'?). "
        "Pick one with --model.norm=NAME."
    )


def test_a_key_registered_twice_is_refused():
    with pytest.raises(ValueError, match=r"norm placement 'pre' is registered twice \(moda_lightning\.norms\.PreNorm, "):

        @register_norm("pre")
        class AnotherPre(NormPlacement):
            pass

    assert norm_class("pre") is PreNorm  # the first registration stands
    with pytest.raises(ValueError, match=r"attention backend 'sdpa' is registered twice"):
        register_backend("sdpa")(type("AnotherSDPA", (AttentionBackend,), {"__call__": lambda self, *a, **k: None}))


def test_only_subclasses_of_the_base_can_register():
    with pytest.raises(TypeError, match=r"attention backend 'not_a_backend' must be a subclass of AttentionBackend"):
        register_backend("not_a_backend")(object)
    assert "not_a_backend" not in registered_backends()


def test_both_registries_share_one_implementation():
    """Attention backends and norm placements word their errors the same way because they are one class."""
    assert isinstance(_BACKENDS, Registry) and isinstance(_NORMS, Registry)
    fresh: Registry[type] = Registry("widget", "Pick one with --widget=NAME.")
    fresh.register("round")(int)
    with pytest.raises(ValueError, match=r"^unknown widget 'rund'; registered: \['round'\] \(did you mean 'round'\?\)\."):
        fresh.get("rund")


# ----------------------------------------------------------------------------- plugins in the config


def test_config_plugins_make_their_keys_selectable():
    from tests.plugins.toy_backend import SandwichNorm, ToyCausalBackend

    config = MoDAConfig(**TINY, plugins=[PLUGIN], attention="toy", norm="toy_sandwich")
    model = MoDATransformer(config)
    assert type(model.backend) is ToyCausalBackend
    assert all(type(block.attn) is SandwichNorm and type(block.ffn) is SandwichNorm for block in model.layers)
    assert config.reads_depth is False  # the plugin's reads_depth=False sets the depth defaults
    calls = ToyCausalBackend.calls
    logits = model(torch.randint(0, 50, (1, 7)))
    assert ToyCausalBackend.calls == calls + TINY["n_layers"]
    assert logits.shape == (1, 7, 50) and torch.isfinite(logits).all()


def test_plugin_backend_computes_what_sdpa_does():
    """Same seed, same weights: the toy backend (an SDPA wrapper under another key) gives the baseline's logits."""
    idx = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    logits = {}
    for attention in ("sdpa", "toy"):
        torch.manual_seed(0)
        model = MoDATransformer(MoDAConfig(**TINY, plugins=[PLUGIN], attention=attention)).eval()
        logits[attention] = model(idx)
    torch.testing.assert_close(logits["toy"], logits["sdpa"], rtol=0, atol=0)


def test_unknown_plugin_module_says_what_to_check():
    with pytest.raises(ValueError) as err:
        MoDAConfig(**TINY, plugins=["tests.plugins.nope"], attention="nope")
    message = str(err.value)
    assert (
        "plugin module 'tests.plugins.nope' could not be imported "
        "(ModuleNotFoundError: No module named 'tests.plugins.nope'); check that it is installed or that the folder "
        "above its package is on PYTHONPATH"
    ) in message
    assert "unknown attention backend 'nope'" in message  # every problem in one error


def test_plugins_given_as_one_string_are_refused():
    with pytest.raises(ValueError, match=r"plugins must be a list of module names .*got 'tests\.plugins\.toy_backend'"):
        MoDAConfig(**TINY, plugins=PLUGIN)


def test_typo_in_a_plugin_norm_gets_the_did_you_mean():
    with pytest.raises(ValueError, match=r"unknown norm placement 'toy_sandwhich'; .*\(did you mean 'toy_sandwich'\?\)"):
        MoDAConfig(**TINY, plugins=[PLUGIN], norm="toy_sandwhich")


def test_depth_option_on_a_plain_backend_lists_the_backends_that_read_depth():
    with pytest.raises(ValueError) as err:
        MoDAConfig(**TINY, plugins=[PLUGIN], attention="toy", ffn_kv=True)
    readers = registered_backends(reads_depth=True)
    assert "toy" not in readers and "moda_torch" in readers
    expected = f"'toy' reads no depth stream, but ffn_kv is on. Use a backend that reads it (--model.attention=NAME, NAME in {readers})"
    assert expected in str(err.value)


# ----------------------------------------------------------------------------- plugins through `moda fit`


def test_moda_fit_trains_with_a_plugin_and_its_checkpoint_imports_it_again(tmp_path, monkeypatch):
    from moda_lightning.cli import main
    from moda_lightning.lightning_module import MoDALightningModule
    import tests.plugins
    from tests.plugins.toy_backend import SandwichNorm, ToyCausalBackend

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"  # a small corpus keeps tokenizer training short
    corpus.write_text((REPO_ROOT / "README.md").read_text(encoding="utf-8") * 2, encoding="utf-8")
    calls = ToyCausalBackend.calls
    main([
        "fit",
        "--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2", "--model.n_kv_heads=1", "--model.max_seq_len=16",
        f"--model.plugins=[{PLUGIN}]", "--model.attention=toy", "--model.norm=toy_sandwich",
        f"--data.files={corpus}", f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.tokenizer_vocab_size=300", "--data.seq_len=16", "--data.batch_size=2",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ])  # fmt: skip
    # 2 training steps and 1 validation batch, each through both layers
    assert ToyCausalBackend.calls - calls >= 3 * 2

    run_dir = tmp_path / "runs" / "moda" / "toy-toy_sandwich" / "version_0"
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["plugins"] == [PLUGIN] and hparams["attention"] == "toy" and hparams["norm"] == "toy_sandwich"

    # A fresh process: the plugin not imported, its keys not registered. Loading must import it again.
    monkeypatch.delitem(sys.modules, PLUGIN)
    monkeypatch.delattr(tests.plugins, "toy_backend")
    monkeypatch.delitem(_BACKENDS._entries, "toy")
    monkeypatch.delitem(_NORMS._entries, "toy_sandwich")
    module = MoDALightningModule.load_from_checkpoint(
        run_dir / "checkpoints" / "last.ckpt", hparams_file=run_dir / "hparams.yaml", map_location="cpu"
    )
    reloaded = sys.modules[PLUGIN]
    assert reloaded.ToyCausalBackend is not ToyCausalBackend  # imported anew, not the cached class
    assert type(module.model.backend) is reloaded.ToyCausalBackend
    assert type(module.model.layers[0].attn) is reloaded.SandwichNorm is not SandwichNorm
    assert module.config.plugins == [PLUGIN]
