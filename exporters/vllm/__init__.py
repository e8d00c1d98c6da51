"""vLLM support: the plugin architecture FlapLlamaForCausalLM, its checks and the export.

Importing this package imports nothing heavy; ``plugin.register`` is the vLLM entry
point and ``model`` is imported by vLLM only when it builds a model (see README.md).
"""
