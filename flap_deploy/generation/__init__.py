"""Text generation: the one sampling vocabulary and PyTorch's generation loop."""
