"""lm-evaluation-harness on an exported folder: its ``hf`` model class (``HFLM``) scores requests of a
small task built here (no download) with the log-likelihoods of the package's own network."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from moda_lightning.data.tokenizer import eot_id  # noqa: E402
from moda_lightning.export.hf import write_folder  # noqa: E402
from tests import test_generate_command  # noqa: E402
from tests.test_export import tiny_model, tokenizer  # noqa: E402, F401  (a fixture)

checkpoint = test_generate_command.checkpoint  # the tiny checkpoint `moda fit` writes, once for this module

# (context, continuation) pairs as a multiple-choice task asks them: the space that starts a
# continuation is the usual convention; one context ends in whitespace, one continuation has no space
PAIRS = [
    ("def main():\n    return", " 0"),
    ("def main():\n    return", " None"),
    ("import", " os\n"),
    ("class Foo:\n   ", " pass"),
    ("x = [1, 2, 3]\nprint(", "len(x))"),
]
DOCUMENTS = ["def f(x):\n    return x + 1\n", "import sys\nprint(sys.argv)\n", "a"]


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):  # noqa: F811
    """A folder exported from a tiny random network (reader keys, tied embeddings) and that network."""
    model = tiny_model(tokenizer, depth_keys="reader", tie_embeddings=True)
    folder = tmp_path_factory.mktemp("lm_eval") / "moda-tiny"
    write_folder(model, tokenizer, folder)
    return folder, model


@pytest.fixture(scope="module")
def harness(exported):
    folder, _ = exported
    return HFLM(pretrained=str(folder), trust_remote_code=True, device="cpu", batch_size=2, dtype="float32")


def _log_probs(model, ids: list[int]) -> torch.Tensor:
    """``log p(ids[t + 1] | ids[: t + 1])`` for every ``t``, from the package network's logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0]
    return torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def _requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_loglikelihood_is_the_networks(harness, exported, tokenizer):  # noqa: F811
    """Each continuation's log-likelihood is the sum of its tokens' log-probabilities given the context,
    and ``is_greedy`` says whether every token is the argmax; a batch of two pads without changing them."""
    _, model = exported
    results = harness.loglikelihood(_requests("loglikelihood", PAIRS))
    assert len(results) == len(PAIRS)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, results):
        # the harness scores a context's trailing whitespace as part of the continuation
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped) :] + continuation
        context_ids = tokenizer.encode(context).ids
        ids = tokenizer.encode(context + continuation).ids
        assert ids[: len(context_ids)] == context_ids  # the split the harness makes (it encodes the whole)
        n = len(ids) - len(context_ids)
        expected = _log_probs(model, ids)[-n:]
        assert logprob == pytest.approx(expected.sum().item(), abs=1e-4)
        with torch.no_grad():
            argmax = model(torch.tensor([ids[:-1]]))[0, -n:].argmax(-1).tolist()
        assert greedy == (argmax == ids[-n:])


def test_loglikelihood_rolling_scores_the_whole_document(harness, exported, tokenizer):  # noqa: F811
    """A document's rolling log-likelihood: every token given the ones before it, the first given
    end-of-text (the harness's prefix token for a model without a beginning-of-sequence token)."""
    _, model = exported
    assert harness.prefix_token_id == eot_id(tokenizer)
    results = harness.loglikelihood_rolling(_requests("loglikelihood_rolling", [(d,) for d in DOCUMENTS]))
    for document, logprob in zip(DOCUMENTS, results):
        ids = [eot_id(tokenizer), *tokenizer.encode(document).ids]
        assert len(ids) <= model.config.max_seq_len  # one window: no overlap to account for
        assert logprob == pytest.approx(_log_probs(model, ids).sum().item(), abs=1e-4)
