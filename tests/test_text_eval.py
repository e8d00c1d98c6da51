"""Text loading, the WikiText detokenizer, and evaluation figures on a tiny model."""

import math

import pytest
import torch

from factories import tiny_dense
from flap_deploy.errors import FlapDeployError
from flap_deploy.evaluation.perplexity import evaluate, token_windows
from flap_deploy.io.text import detokenize_wikitext, load_text, looks_like_wikitext


class CharTokenizer:
    """Maps characters to ids < 128, enough to drive evaluate() without a real tokenizer."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 128 for c in text]}


def test_wikitext_is_recognized_and_detokenized():
    raw = " = Title = \n The 1 @,@ 000 @-@ year span , 3 @.@ 5 m . Next"
    assert looks_like_wikitext(raw)
    assert detokenize_wikitext(raw) == " = Title = \n The 1,000-year span, 3.5 m. Next"
    assert not looks_like_wikitext("Plain text, with commas. And periods.")


def test_load_text_directory_and_errors(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("\ufefffirst")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert load_text(tmp_path) == "first\n\nsecond"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlapDeployError, match="no text files"):
        load_text(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("   \n")
    with pytest.raises(FlapDeployError, match="is empty"):
        load_text(tmp_path / "blank.txt")


def test_wikitext_file_is_detokenized(wikitext_dir):
    text = load_text(wikitext_dir / "valid.txt")
    assert " @-@ " not in text and not text.startswith("\ufeff")


def test_token_windows_keep_to_the_budget_and_refuse_a_too_short_text():
    tok = CharTokenizer()
    windows = token_windows(tok, "x" * 1000, seqlen=64, max_tokens=300)
    assert windows.shape == (4, 64)
    with pytest.raises(FlapDeployError, match="fewer than one window of 64"):
        token_windows(tok, "short", seqlen=64)


def test_evaluate_against_itself_and_another_model():
    tok, text = CharTokenizer(), "the quick brown fox jumps over the lazy dog " * 20
    model, other = tiny_dense("llama", seed=0), tiny_dense("llama", seed=5)
    same = evaluate(model, tok, text, seqlen=32, reference=model, progress=False)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    assert same.perplexity == pytest.approx(same.reference_perplexity)
    diff = evaluate(model, tok, text, seqlen=32, reference=other, progress=False)
    assert diff.kl > 0.01 and diff.top1_agreement < 1.0
    # perplexity equals exp of the mean next-token NLL computed directly
    ids = token_windows(tok, text, 32)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-1], -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).mean().item()
    assert diff.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
