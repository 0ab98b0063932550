"""Native PyTorch model modules, one per architecture."""
