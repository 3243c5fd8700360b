"""Dispatch planning: which pool replica computes which routed token rows, and how results combine.

Pure functions over tensors (no Ray): the Attention Router itself is model math (`model/`) and runs
in the gateway; this package only moves its decisions to expert pools."""
