"""The `yuan-serve` command line."""
