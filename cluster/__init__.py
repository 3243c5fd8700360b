"""Cluster set-up: the embedded or existing Ray cluster and the placement of experts onto pools."""
