"""FLAP against the baselines on the bundled SmolLM2-135M (the paper's claim, at small scale)."""

import pytest
import torch

from flap_deploy import PruneConfig, prune
from flap_deploy.evaluate import evaluate
from flap_deploy.model_ref import load_model, load_tokenizer
from flap_deploy.text import load_text


@pytest.mark.slow
def test_flap_beats_wanda_sp_and_magnitude_sp_at_20_percent(bundled_dir, wikitext_dir):
    dense = load_model(bundled_dir, dtype=torch.float32)
    tok = load_tokenizer(bundled_dir)
    test_text = load_text(wikitext_dir / "test.txt")
    ppl = {}
    for method in ("flap", "wanda-sp", "mag-sp"):
        config = PruneConfig(ratio=0.2, method=method, calib=str(wikitext_dir / "valid.txt"), nsamples=128,
                             seqlen=128, progress=False)
        result = prune(dense, config, tokenizer=tok)
        assert abs(result.achieved_ratio - 0.2) <= 0.005
        ppl[method] = evaluate(result.model, tok, test_text, seqlen=512, max_tokens=8192, progress=False).perplexity
        del result
    assert ppl["flap"] < ppl["wanda-sp"], ppl
    assert ppl["flap"] < ppl["mag-sp"], ppl
