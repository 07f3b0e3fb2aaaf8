"""Sharded data loading: shard index and assignment, tar reading, packed text streams."""
