"""One decoder layer resident at a time: the layer stream, passes over a hidden-state buffer, the memory plan and this process's memory."""
