"""Expert pools: processes that each host a subset of the 32 experts of every layer."""
