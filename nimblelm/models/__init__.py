"""Model definitions, the registry of packaged models, and weight loading (HF folders and GGUF files)."""
