"""`moda export`: a checkpoint as a transformers folder that loads, scores and generates like the package's
network, in a Python where moda_lightning and moda_kernels cannot be imported; and back again."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402
from transformers.dynamic_module_utils import get_imports, get_relative_import_files  # noqa: E402

import moda_lightning.model  # noqa: E402
from moda_lightning.config import MoDAConfig  # noqa: E402
from moda_lightning.data.tokenizer import eot_id  # noqa: E402
from moda_lightning.export import command  # noqa: E402
from moda_lightning.export.bundle import BundleError, build_bundle, rewrite_imports  # noqa: E402
from moda_lightning.export.hf import load_exported, write_folder  # noqa: E402
from moda_lightning.model import MoDATransformer  # noqa: E402
from moda_lightning.trained import load_trained  # noqa: E402
from tests import test_generate_command  # noqa: E402
from tests.test_cli import moda_command  # noqa: E402

checkpoint = test_generate_command.checkpoint  # the tiny checkpoint `moda fit` writes, once for this module

PROMPTS = ["def main():\n    return", "import os\n"]

CONFIGS = {
    "pre-tied": dict(tie_embeddings=True),
    "post-untied-no-ffn-kv": dict(norm="post", ffn_kv=False),
    "olmo2-attn-kv-proj-reader": dict(norm="olmo2", attn_kv_proj=True, depth_keys="reader"),
    "reader-full-qk-norm-tied": dict(depth_keys="reader", qk_norm_scope="full", tie_embeddings=True),
    "bias-last-layer-proj-olmo2-init": dict(linear_bias=True, last_layer_depth_proj=True, init_scheme="olmo2"),
    "sdpa-baseline": dict(attention="sdpa"),
}

# Run in a fresh interpreter (-I: no PYTHONPATH, no user site) where importing moda_lightning or
# moda_kernels fails however they are installed: the folders must load with torch and transformers.
ISOLATED = textwrap.dedent(
    """
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("moda_lightning", "moda_kernels"):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, Refuse())
    import torch
    from transformers import AutoModelForCausalLM

    results = {}
    for folder in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        ids = torch.load(folder + "/ids.pt")
        with torch.no_grad():
            logits = model(ids).logits
        greedy = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
        module = sys.modules[type(model.model).__module__]
        results[folder] = {"logits": logits, "greedy": greedy, "fused_norm_rope": module._has_triton()}
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("moda_lightning", "moda_kernels"))
    assert not leaked, leaked
    torch.save(results, sys.argv[1])
    """
)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_trained(checkpoint, "cpu")[1].tokenizer


def tiny_model(tokenizer, **options) -> MoDATransformer:
    torch.manual_seed(0)
    config = MoDAConfig(
        vocab_size=tokenizer.get_vocab_size(), d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=48,
        **options,
    )  # fmt: skip
    return MoDATransformer(config).eval()


def until_eos(tokens: list[int], eos: int) -> list[int]:
    """transformers pads a row that ended with eos; the package stops and leaves eos out."""
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def prompt_ids(tokenizer) -> torch.Tensor:
    ids = [tokenizer.encode(p).ids for p in PROMPTS]
    width = min(len(i) for i in ids)
    return torch.tensor([i[:width] for i in ids])


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """One folder per configuration, with the package network it came from and its ids."""
    root = tmp_path_factory.mktemp("exported")
    folders = {}
    for name, options in CONFIGS.items():
        model = tiny_model(tokenizer, **options)
        folder = root / name
        write_folder(model, tokenizer, folder)
        torch.save(prompt_ids(tokenizer), folder / "ids.pt")
        folders[name] = (folder, model)
    return folders


@pytest.fixture(scope="module")
def isolated_results(exported, tmp_path_factory):
    """What the folders compute in a Python that cannot import moda_lightning or moda_kernels."""
    tmp = tmp_path_factory.mktemp("isolated")
    out = tmp / "results.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp / "modules"), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-I", "-c", ISOLATED, str(out), *(str(folder) for folder, _ in exported.values())]
    result = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out, weights_only=False)


# --- the folder against the package's network -------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_the_folder_loads_without_the_package_and_gives_the_networks_logits(name, exported, isolated_results):
    folder, model = exported[name]
    got = isolated_results[str(folder)]
    ids = torch.load(folder / "ids.pt")
    with torch.no_grad():
        expected = model(ids)
    torch.testing.assert_close(got["logits"], expected, rtol=0, atol=1e-5)
    eos = json.loads((folder / "config.json").read_text())["eos_token_id"]
    expected_greedy = model.generate([ids[0].tolist()], 6, temperature=0, eos_id=eos)[0]
    assert until_eos(got["greedy"][0, ids.shape[1] :].tolist(), eos) == expected_greedy
    assert got["fused_norm_rope"] is False  # no moda_kernels: the fused norm+rope path is off


@pytest.mark.parametrize("name", CONFIGS)
def test_load_exported_round_trips_to_identical_logits(name, exported):
    folder, model = exported[name]
    config, state = load_exported(folder)
    assert config == model.config
    rebuilt = MoDATransformer(config).eval()
    rebuilt.load_state_dict(state)
    ids = torch.load(folder / "ids.pt")
    with torch.no_grad():
        assert torch.equal(rebuilt(ids), model(ids))
    if config.tie_embeddings:
        assert rebuilt.lm_head.weight is rebuilt.embed.weight


def test_tied_embeddings_are_stored_once_and_tied_again_on_load(exported):
    from safetensors import safe_open

    folder, model = exported["pre-tied"]
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert "model.embed.weight" in keys and "model.lm_head.weight" not in keys
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert hf.model.lm_head.weight is hf.model.embed.weight
    untied, _ = exported["post-untied-no-ffn-kv"]
    with safe_open(str(untied / "model.safetensors"), "pt") as weights:
        assert "model.lm_head.weight" in set(weights.keys())


def test_padded_batches_generate_like_the_package_and_labels_give_the_loss(exported, tokenizer):
    folder, model = exported["olmo2-attn-kv-proj-reader"]
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True, padding_side="left")
    batch = hf_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert batch.attention_mask.min() == 0  # the prompts differ in length: one row is padded
    out = hf.generate(**batch, max_new_tokens=5, do_sample=False)
    eos = eot_id(tokenizer)
    expected = model.generate([tokenizer.encode(p).ids for p in PROMPTS], 5, temperature=0, eos_id=eos)
    assert [until_eos(row, eos) for row in out[:, batch.input_ids.shape[1] :].tolist()] == expected

    ids = torch.load(folder / "ids.pt")
    with torch.no_grad():
        result = hf(ids, labels=ids)
        logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(result.loss, loss)


@torch.no_grad()
def test_logits_to_keep_is_honoured_and_refused_with_labels(loaded):
    """``generate()`` asks for the last position's logits only (``logits_to_keep=1``): the folder
    computes just those, cached or not, and refuses the option beside ``labels``, whose loss needs all."""
    hf = loaded["pre-tied"]
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    full = hf(ids).logits
    torch.testing.assert_close(hf(ids, logits_to_keep=1).logits, full[:, -1:], rtol=0, atol=1e-6)
    cache = DynamicCache(config=hf.config)
    hf(ids[:, :4], cache=cache)
    torch.testing.assert_close(hf(ids[:, 4:], cache=cache, logits_to_keep=1).logits, full[:, -1:], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="labels need the logits of every position; leave logits_to_keep at 0"):
        hf(ids, labels=ids, logits_to_keep=1)


@pytest.mark.parametrize("cache_argument", ["use_cache", "cache", "past_key_values"])
def test_generate_takes_a_transformers_cache_and_decodes_like_the_package(exported, tokenizer, cache_argument):
    """``generate()`` given ``use_cache=True`` or a ``DynamicCache`` (``cache=``, or the older
    ``past_key_values=``) gives the package's greedy tokens, and a cache handed in holds the sequence
    keys of every position but the last token's (whose forward is never run)."""
    folder, model = exported["reader-full-qk-norm-tied"]
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = [tokenizer.encode(p).ids for p in PROMPTS]
    kw = {"use_cache": True} if cache_argument == "use_cache" else {cache_argument: DynamicCache(config=hf.config)}
    out = hf.generate(torch.tensor(ids[:1]), max_new_tokens=5, do_sample=False, **kw)
    eos = eot_id(tokenizer)
    assert until_eos(out[0, len(ids[0]) :].tolist(), eos) == model.generate(ids[:1], 5, temperature=0, eos_id=eos)[0]
    if cache_argument != "use_cache":
        assert kw[cache_argument].get_seq_length() == out.shape[1] - 1


@pytest.fixture(scope="module")
def loaded(exported):
    """Each folder loaded through transformers once (the tests below only read the model)."""
    return {name: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            for name, (folder, _) in exported.items()}  # fmt: skip


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_generation_equals_recomputing_and_the_package(name, exported, loaded, tokenizer):
    """Greedy ``generate()`` with the cache (the folder's default) feeds the prompt once and then one
    token per step, and picks the tokens of ``use_cache=False`` (every step recomputes the sequence)
    and of the package's own ``MoDATransformer.generate``."""
    _, model = exported[name]
    hf = loaded[name]
    assert hf.generation_config.use_cache is True
    prompt = tokenizer.encode(PROMPTS[0]).ids
    lengths = []
    hook = hf.model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    try:
        cached = hf.generate(torch.tensor([prompt]), max_new_tokens=8)[0, len(prompt) :].tolist()
    finally:
        hook.remove()
    assert lengths == [len(prompt)] + [1] * (len(cached) - 1)
    recomputed = hf.generate(torch.tensor([prompt]), max_new_tokens=8, use_cache=False)[0, len(prompt) :].tolist()
    assert cached == recomputed
    eos = eot_id(tokenizer)
    assert until_eos(cached, eos) == model.generate([prompt], 8, temperature=0, eos_id=eos)[0]


def test_beam_search_reorders_the_cache(loaded, tokenizer):
    """Beam search picks beams by index after every step; the cache must follow them."""
    hf = loaded["olmo2-attn-kv-proj-reader"]
    prompt = torch.tensor([tokenizer.encode(PROMPTS[0]).ids])
    cached = hf.generate(prompt, max_new_tokens=6, num_beams=3)
    assert torch.equal(cached, hf.generate(prompt, max_new_tokens=6, num_beams=3, use_cache=False))


@pytest.mark.parametrize("name", CONFIGS)
def test_a_left_padded_batch_generates_each_prompt_as_it_would_alone(name, loaded, exported):
    folder, _ = exported[name]
    hf = loaded[name]
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True, padding_side="left")
    batch = hf_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert batch.attention_mask.min() == 0  # the prompts differ in length: one row is padded
    together = hf.generate(**batch, max_new_tokens=8)[:, batch.input_ids.shape[1] :]
    eos = hf.config.eos_token_id
    for row, text in zip(together.tolist(), PROMPTS):
        alone = hf_tokenizer(text, return_tensors="pt")
        assert until_eos(row, eos) == until_eos(
            hf.generate(**alone, max_new_tokens=8)[0, alone.input_ids.shape[1] :].tolist(), eos
        )


@pytest.mark.parametrize("positions", ["from-mask", "given"])
@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_a_cached_decode_step_gives_the_logits_of_a_full_forward(name, positions, loaded, tokenizer):
    """A left-padded batch of two prompts goes in with an empty ``DynamicCache``, then three decode
    steps of one token each, ``attention_mask`` growing as ``generate()`` grows it (and, for
    ``given``, the ``position_ids`` it computes): each row's logits at every real position equal
    those of one forward pass over that row alone (no cache, no padding). Without a mask or
    positions, a row alone continues from the number of cached tokens. A cache holding other keys
    than the sequence attention's (such as a reader-keys slot, which is unrotated), positions that
    restart at each call, or a lost key mask move these logits in every configuration; positions
    that count the padding shift a whole row, which only reader depth keys (unrotated, against a
    rotated query) can see."""
    hf = loaded[name]
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    steps = torch.randint(0, hf.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1

    def position_ids(mask: torch.Tensor, new: int) -> dict:
        return {"position_ids": (mask.cumsum(1) - 1).clamp(min=0)[:, -new:]} if positions == "given" else {}

    cache = DynamicCache(config=hf.config)
    out = hf(ids, attention_mask=mask, cache=cache, **position_ids(mask, width))
    assert out.cache is cache and cache.get_seq_length() == width
    logits = [out.logits]
    for step in range(steps.shape[1]):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        logits.append(hf(steps[:, step : step + 1], attention_mask=mask, cache=cache, **position_ids(mask, 1)).logits)
    logits = torch.cat(logits, dim=1)
    assert cache.get_seq_length() == width + steps.shape[1]
    for row, p in enumerate(prompts):
        alone = hf(torch.tensor([p + steps[row].tolist()])).logits[0]
        torch.testing.assert_close(logits[row, width - len(p) :], alone, rtol=0, atol=1e-5)

    cache = DynamicCache()
    pieces = [hf(torch.tensor([prompts[0]]), cache=cache).logits]
    pieces += [hf(steps[:1, step : step + 1], cache=cache).logits for step in range(steps.shape[1])]
    alone = hf(torch.tensor([prompts[0] + steps[0].tolist()])).logits[0]
    torch.testing.assert_close(torch.cat(pieces, dim=1)[0], alone, rtol=0, atol=1e-5)


BAD_CALLS = {
    "mask of the new tokens only": (
        lambda hf, cache: hf(torch.tensor([[5]]), attention_mask=torch.ones(1, 1), cache=cache),
        ValueError,
        r"attention_mask is \[1, 1\], but with 4 cached tokens and 1 new ones it must be \[1, 5\]",
    ),
    "past max_seq_len": (
        lambda hf, cache: hf(torch.zeros(1, 45, dtype=torch.long), cache=cache),
        ValueError,
        r"4 cached tokens and 45 new ones reach past the model's max_seq_len=48",
    ),
    "positions off the rotary table": (
        lambda hf, cache: hf(torch.tensor([[5]]), position_ids=torch.tensor([[48]])),
        ValueError,
        r"position_ids range over \[48, 48\], outside the model's rotary table \[0, 48\)",
    ),
    "a legacy tuple": (
        lambda hf, cache: hf(torch.tensor([[5]]), cache=((torch.zeros(1), torch.zeros(1)),)),
        TypeError,
        r"takes a transformers Cache \(e.g. DynamicCache\(\)\) as its cache, not tuple",
    ),
    "a static cache": (
        lambda hf, cache: hf.generate(torch.tensor([[5, 6]]), max_new_tokens=2, cache_implementation="static"),
        ValueError,
        r"decodes with a dynamic cache only; StaticCache is a static or sliding-window cache",
    ),
}


@pytest.mark.parametrize("case", BAD_CALLS)
@torch.no_grad()
def test_a_call_the_cache_cannot_serve_says_what_to_pass(case, loaded):
    hf = loaded["pre-tied"]
    cache = DynamicCache(config=hf.config)
    hf(torch.tensor([[1, 2, 3, 4]]), cache=cache)
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message) as raised:
        call(hf, cache)
    assert "\n" not in str(raised.value)


def test_every_attention_layer_runs_on_the_backend_the_wrapper_picks(exported):
    folder, model = exported["pre-tied"]
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert hf.backend_for(torch.device("cpu")) == "moda_torch"
    portable = type(hf.model.backend)
    calls = []

    class Counting(portable):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    hf.use_backend("counting", Counting())
    ids = torch.load(folder / "ids.pt")
    with torch.no_grad():
        torch.testing.assert_close(hf.model(ids), model(ids), rtol=0, atol=1e-5)
    assert len(calls) == model.config.n_layers


# --- the command --------------------------------------------------------------------------------------


def test_export_command_writes_a_folder_transformers_loads(checkpoint, tmp_path, capsys):
    out = tmp_path / "moda-tiny"
    assert command.main(["--ckpt_path", str(checkpoint), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "configuration_moda.py", "modeling_moda.py", "model.py"}  # fmt: skip
    assert expected <= names and [p.name for p in tmp_path.iterdir()] == ["moda-tiny"]  # no temporary left
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "moda"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moda.MoDAForCausalLM"

    model, read = load_trained(checkpoint, "cpu")
    hf_tokenizer = AutoTokenizer.from_pretrained(out)  # the tokenizer needs no remote code
    text = PROMPTS[0]
    assert hf_tokenizer(text).input_ids == read.tokenizer.encode(text).ids
    assert hf_tokenizer.decode(hf_tokenizer(text).input_ids) == text
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.model_max_length == model.config.max_seq_len

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert hf.config.max_position_embeddings == model.config.max_seq_len  # what lm-eval reads
    ids = torch.tensor([read.tokenizer.encode(text).ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-5)
    greedy = hf.generate(ids, max_new_tokens=8)[0, ids.shape[1] :].tolist()
    eos = eot_id(read.tokenizer)
    assert until_eos(greedy, eos) == model.generate([ids[0].tolist()], 8, temperature=0, eos_id=eos)[0]


def test_an_existing_folder_is_refused_before_any_work_and_replaced_with_force(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the request was checked")

    with monkeypatch.context() as patch:
        patch.setattr("moda_lightning.trained.load_trained", must_not_run)
        with pytest.raises(ValueError, match=r"--out .*taken exists and is not empty; .*--force"):
            command.main(["--ckpt_path", str(checkpoint), "--out", str(out)])
    assert (out / "notes.txt").read_text() == "keep me"
    assert command.main(["--ckpt_path", str(checkpoint), "--out", str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()


def test_without_transformers_the_command_says_what_to_install(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    message = r"needs transformers, which is not installed here: pip install transformers safetensors"
    with pytest.raises(ValueError, match=message):
        command.main(["--ckpt_path", str(checkpoint), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_a_missing_checkpoint_is_one_line_from_the_shell(tmp_path):
    result = subprocess.run([*moda_command(), "export", "--ckpt_path=missing.ckpt", f"--out={tmp_path / 'x'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines[0].startswith("moda: error: --ckpt_path missing.ckpt does not exist"), result.stderr
    assert not (tmp_path / "x").exists()


def test_a_plugin_backend_is_refused(tokenizer, tmp_path, monkeypatch):
    from moda_lightning.attention.moda_torch import MoDATorchBackend

    plugin = type("PluginBackend", (MoDATorchBackend,), {"__module__": "my_pkg.backends"})
    monkeypatch.setattr("moda_lightning.export.hf.backend_class", lambda key: plugin)
    with pytest.raises(ValueError, match=r"attention backend 'moda_torch' \(my_pkg.backends\) from a plugin"):
        write_folder(tiny_model(tokenizer), tokenizer, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# --- the generated code -------------------------------------------------------------------------------


def test_transformers_copies_every_generated_file_and_finds_no_other_requirement(tmp_path):
    bundle = build_bundle()
    bundle.write(tmp_path)
    reached = {Path(p).name for entry in ("modeling_moda.py", "configuration_moda.py")
               for p in get_relative_import_files(tmp_path / entry)}  # fmt: skip
    assert reached | {"modeling_moda.py", "configuration_moda.py"} == set(bundle.files)
    # The scan transformers runs on each file of a Hub repository before loading it.
    required = {name for f in bundle.files for name in get_imports(tmp_path / f)}
    assert required - sys.stdlib_module_names == {"torch", "transformers"}
    assert {"model.py", "ops.py", "moda_kernels_moda_attn_reference.py", "attention_sdpa.py"} <= set(bundle.files)


def test_the_guard_the_folder_overrides_is_still_the_models():
    # modeling_moda.py turns the fused norm kernels off where moda_kernels is missing by replacing
    # model._has_triton; if the model stops asking it, that override does nothing.
    assert "_has_triton()" in inspect.getsource(moda_lightning.model._fused_norm_kernels_apply)
    for caller in (moda_lightning.model.norm_then_rope, moda_lightning.model.reader_slot_key):
        assert "_fused_norm_kernels_apply(" in inspect.getsource(caller)


def _rewrite(source: str, module: str = "moda_lightning.thing", submodules: tuple[str, ...] = ()) -> str:
    return rewrite_imports(textwrap.dedent(source), module, is_submodule=lambda p, n: f"{p}.{n}" in submodules).source


def test_rewrite_points_package_imports_at_flat_files():
    flat = {
        "from moda_lightning.attention.base import A, B as C": "from .attention_base import A, B as C",
        "from moda_kernels.moda_attn import check": "from .moda_kernels_moda_attn import check",
        "def f():\n    from moda_lightning.norms import (\n        RMSNorm,\n        QKNorm,\n    )\n    return 1":
            "def f():\n    from .norms import RMSNorm, QKNorm\n    return 1",
    }  # fmt: skip
    for source, rewritten in flat.items():
        assert _rewrite(source + "\n") == rewritten + "\n"
    inside = "moda_lightning.attention.sdpa"  # relative imports resolve from the module's package
    assert _rewrite("from .norms import RMSNorm\n", inside) == "from .attention_norms import RMSNorm\n"
    assert _rewrite("from ..norms import RMSNorm\n", inside) == "from .norms import RMSNorm\n"
    kept = "import math\nfrom torch import nn\nfrom transformers import PreTrainedModel\n"
    assert _rewrite(kept) == kept
    source = "from moda_lightning.attention import sdpa, build\n"
    submodule = _rewrite(source, submodules=("moda_lightning.attention.sdpa",))
    assert submodule.splitlines()[0] == "from .attention import build"
    assert submodule.splitlines()[1].startswith("from .attention_sdpa import __name__ as _")
    assert submodule.splitlines()[2].startswith("from . import attention_sdpa as sdpa")


def test_rewrite_guards_fused_kernels_and_refuses_what_a_folder_cannot_carry():
    guarded = _rewrite("def f(x):\n    from moda_kernels.norm_rope import norm_rope\n    return norm_rope(x)\n")
    assert "    try:\n        from moda_kernels.norm_rope import norm_rope\n    except ImportError as err:" in guarded
    compile(guarded, "guarded", "exec")
    refused = {
        "from moda_kernels.norm_rope import norm_rope\n": "import it inside the function",
        "import lightning\n": "imports lightning, which an exported folder cannot require",
        "def f():\n    import tokenizers\n": "imports tokenizers",
        "import moda_lightning.model\n": "cannot be bundled",
        "from moda_lightning.model import *\n": "cannot be bundled",
        "from moda_lightning import MoDAConfig\n": "package root",
        "import importlib\nm = importlib.import_module('moda_lightning.data')\n": "through importlib",
        "x = 1; from moda_lightning.norms import RMSNorm\n": "shares its line",
    }
    for source, message in refused.items():
        with pytest.raises(BundleError, match=message):
            _rewrite(source)
