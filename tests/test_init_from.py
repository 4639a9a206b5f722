"""`--model.init_from=DIR`: a run starts from the weights of a folder that `moda export` wrote."""

from __future__ import annotations

import pytest
import torch

from moda_lightning.export.hf import export_checkpoint
from moda_lightning.lightning_module import MoDALightningModule
from moda_lightning.trained import load_trained
from tests.test_generate_command import checkpoint  # noqa: F401  (the trained tiny checkpoint fixture)

pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("export") / "model"
    export_checkpoint(checkpoint, folder)
    return folder


def module_like(model, **changes) -> MoDALightningModule:
    cfg = model.config
    shape = dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                 n_kv_heads=cfg.n_kv_heads, max_seq_len=cfg.max_seq_len) | changes  # fmt: skip
    return MoDALightningModule(**shape)


def test_the_run_starts_from_the_exported_weights(checkpoint, exported):  # noqa: F811
    trained, _ = load_trained(checkpoint, "cpu")
    module = module_like(trained, init_from=str(exported))
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(module.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert not torch.equal(module_like(trained).model.embed.weight, trained.embed.weight)  # without it: fresh init


def test_another_architecture_is_refused_with_the_flags_to_pass(checkpoint, exported):  # noqa: F811
    trained, _ = load_trained(checkpoint, "cpu")
    with pytest.raises(ValueError, match=f"pass --model.d_model={trained.config.d_model}.*--model.norm=pre"):
        module_like(trained, d_model=2 * trained.config.d_model, norm="post", init_from=str(exported))


def test_a_folder_that_is_not_an_export_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no config.json"):
        MoDALightningModule(vocab_size=64, init_from=str(tmp_path))


def test_moda_fit_trains_from_an_export_and_refuses_a_mismatch_before_any_work(exported, tmp_path, monkeypatch):
    from moda_lightning.cli import main
    from tests.test_cli import TINY

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="--model.d_model=32"):
        main(["fit", *TINY, "--model.d_model=64", f"--model.init_from={exported}", f"--data.cache_dir={cache}"])
    assert not cache.exists()  # refused before the tokenizer was trained
    main(["fit", *TINY, f"--model.init_from={exported}", f"--data.cache_dir={cache}", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=0"])  # fmt: skip
    assert list((tmp_path / "runs").rglob("last.ckpt"))
