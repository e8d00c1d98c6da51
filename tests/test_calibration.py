import sys

import pytest
import torch

from factories import VOCAB, tiny_dense
from flap_deploy.pruning.calibration import calibration_windows, random_windows, self_generated
from flap_deploy.errors import FlapDeployError


class WordTokenizer:
    """A unit-test stand-in: one token per whitespace-separated word (ids modulo the tiny vocab)."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [hash(w) % VOCAB for w in text.split()]}


def test_text_file_windows_are_seeded_random_slices(tmp_path):
    words = [f"w{i}" for i in range(500)]
    (tmp_path / "a.txt").write_text(" ".join(words))
    tok = WordTokenizer()
    a = calibration_windows(str(tmp_path / "a.txt"), None, tok, nsamples=10, seqlen=16, seed=0, progress=False)
    b = calibration_windows(str(tmp_path), None, tok, nsamples=10, seqlen=16, seed=0, progress=False)  # directory
    c = calibration_windows(str(tmp_path / "a.txt"), None, tok, nsamples=10, seqlen=16, seed=1, progress=False)
    assert a.input_ids.shape == (10, 16)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    stream = torch.tensor(tok(" ".join(words))["input_ids"])
    for row in a.input_ids:  # every window is a contiguous slice of the token stream
        assert any(torch.equal(row, stream[s:s + 16]) for s in range(len(stream) - 15))


def test_wikitext_is_detokenized(tmp_path):
    seen = []

    class Recorder(WordTokenizer):
        def __call__(self, text, **kw):
            seen.append(text)
            return super().__call__(text, **kw)

    (tmp_path / "w.txt").write_text(" = Title = \n" + "the 1 @,@ 000 @-@ year war , ok . " * 20)
    calibration_windows(str(tmp_path / "w.txt"), None, Recorder(), nsamples=2, seqlen=8, seed=0, progress=False)
    assert "@-@" not in seen[0] and "1,000-year war, ok." in seen[0]


def test_too_short_text_is_an_error():
    with pytest.raises(FlapDeployError, match="fewer than one window of 128"):
        random_windows(list(range(100)), 4, 128, 0, "short.txt")


def test_missing_source_and_unknown_dataset(tmp_path):
    with pytest.raises(FlapDeployError, match="no such file"):
        calibration_windows(str(tmp_path / "nope.txt"), None, WordTokenizer(), 2, 8, 0)
    with pytest.raises(FlapDeployError, match="unknown calibration dataset"):
        calibration_windows("hf:c4", None, WordTokenizer(), 2, 8, 0)


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(FlapDeployError, match="needs the 'datasets' package"):
        calibration_windows("hf:wikitext2", None, WordTokenizer(), 2, 8, 0)


def test_self_generated_samples_are_seeded_and_start_at_bos():
    model = tiny_dense("llama")
    a = self_generated(model, None, nsamples=5, seqlen=12, seed=0, batch_size=2, progress=False)
    b = self_generated(model, None, nsamples=5, seqlen=12, seed=0, batch_size=2, progress=False)
    c = self_generated(model, None, nsamples=5, seqlen=12, seed=1, batch_size=2, progress=False)
    assert a.shape == (5, 12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == model.config.bos_token_id).all()
    assert not (a[:, 1:] == model.config.eos_token_id).any()
    assert len(set(a[:, 1:].flatten().tolist())) > 10  # sampled, not a constant


def test_a_long_text_is_tokenized_in_pieces_with_the_ids_of_one_call(wikitext_dir, bundled_dir, monkeypatch):
    """The calibration text goes through the tokenizer a piece at a time (its working memory bounded), and
    the ids equal those of the whole text at once for the bundled byte-level BPE tokenizer."""
    from transformers import AutoTokenizer

    from flap_deploy.io.text import load_text
    from flap_deploy.pruning import calibration

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    text = load_text(wikitext_dir / "valid.txt")
    calls = []
    real = tok.__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, piece, **kw: calls.append(len(piece)) or real(piece, **kw))
    ids = calibration._tokens(tok, text)
    assert len(calls) > 10 and max(calls) < 2 * calibration.TOKENIZE_CHARS and sum(calls) == len(text)
    monkeypatch.undo()
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
