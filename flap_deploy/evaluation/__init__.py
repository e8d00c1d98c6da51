"""How good a model is: perplexity / KL / top-1 layer by layer, zero-shot tasks through lm-evaluation-harness, their reports."""
