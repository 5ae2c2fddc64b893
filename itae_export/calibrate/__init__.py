"""Choosing theta: projection-norm samples, the bimodality-based suggestion, --theta auto, and the
inspection pictures (histogram, CLS attention maps)."""
