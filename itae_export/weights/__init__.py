"""Checkpoints: read any official layout, detect its format from its keys, convert with pure key maps,
load strictly; official downloads and the hub cache."""
