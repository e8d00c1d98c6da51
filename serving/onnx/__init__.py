"""The built-in ONNX Runtime OpenAI-compatible server: continuous-batching engine, HTTP app, guards, metrics, schemas."""
