"""The per-layer-width architecture and its contract: the modeling file, the families it imports from, masks and widths, the config, expected tensors, parameter counts, the TP rule."""
