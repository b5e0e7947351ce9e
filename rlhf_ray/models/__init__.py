"""Models of every phase: loading (and LoRA, saving), forward passes, sampling."""
