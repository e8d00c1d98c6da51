"""transformers' per-layer form of a pruned checkpoint (``export hf``); see export.py."""
