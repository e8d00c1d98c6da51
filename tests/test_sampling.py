"""Unit tests of flap_deploy.generation.sampling, shared by PyTorch and ONNX Runtime generation and the server."""

from __future__ import annotations

import numpy as np
import pytest

from flap_deploy.errors import ParameterError
from flap_deploy.generation.sampling import SamplingParams, find_stop, log_softmax, next_token, probabilities, top_logprobs

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.1]))


def test_temperature_one_recovers_the_softmax():
    np.testing.assert_allclose(probabilities(LOGITS, 1.0), [0.5, 0.25, 0.15, 0.1])


def test_top_k_keeps_the_k_best_renormalised():
    np.testing.assert_allclose(probabilities(LOGITS, 1.0, top_k=2), [2 / 3, 1 / 3, 0, 0])


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    np.testing.assert_allclose(probabilities(LOGITS, 1.0, top_p=0.7), [2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(probabilities(LOGITS, 1.0, top_p=0.75), [2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(probabilities(LOGITS, 1.0, top_p=0.76), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0])
    np.testing.assert_allclose(probabilities(LOGITS, 1.0, top_p=0.01), [1, 0, 0, 0])


def test_low_temperature_sharpens():
    p = probabilities(LOGITS, 0.25)
    assert p[0] > 0.9 and np.isclose(p.sum(), 1)


def test_greedy_is_the_argmax_and_a_seed_repeats_draws_at_their_probabilities():
    assert next_token(LOGITS, SamplingParams()) == 0
    params = SamplingParams(temperature=1.0, seed=7)
    draws = [next_token(LOGITS, params, rng) for rng in [params.rng()] for _ in range(400)]
    again = [next_token(LOGITS, params, rng) for rng in [params.rng()] for _ in range(400)]
    assert draws == again
    freq = np.bincount(draws, minlength=4) / 400
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.1], atol=0.07)


def test_find_stop_and_parameter_checks():
    assert find_stop("hello world. bye", [".", "bye"]) == 11
    assert find_stop("hello", ["x", ""]) is None
    assert SamplingParams(stop="END").stop == ("END",)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_tokens=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_banned_tokens_and_raw_logprobs():
    assert next_token(LOGITS, SamplingParams(), banned=[0]) == 1
    params = SamplingParams(temperature=1.0, seed=3)
    rng = params.rng()
    assert 0 not in [next_token(LOGITS, params, rng, banned=(0,)) for _ in range(200)]
    np.testing.assert_allclose(np.exp(log_softmax(LOGITS)), [0.5, 0.25, 0.15, 0.1])
    assert [t for t, _ in top_logprobs(LOGITS, 2)] == [0, 1]


def test_parameter_errors_name_the_parameter():
    with pytest.raises(ParameterError) as e:
        SamplingParams(max_tokens=-1)
    assert e.value.param == "max_tokens" and str(e.value) == "max_tokens must be >= 0, got -1"
