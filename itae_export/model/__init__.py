"""The PyTorch model: one ViT with the upstream parameter names, ITAE injected into its last block,
and the two ITAE steps as torch custom ops. Importing anything here imports torch."""
