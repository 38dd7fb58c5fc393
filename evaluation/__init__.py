"""Offline evaluation of DaGAN checkpoints: self-reenactment metrics (``dagan eval``), the face-api
identity/expression networks in PyTorch, and the data-preparation step that fetches their weights."""
