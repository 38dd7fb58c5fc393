"""Offline evaluation of DaGAN checkpoints: self-reenactment metrics (``dagan eval``), cross-identity
reenactment through the deployed engine (``dagan eval-cross``: motion gains, identity, jitter), the
face-api identity/expression networks in PyTorch, and the data-preparation step that fetches their
weights."""
