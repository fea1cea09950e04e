"""Checkpoint I/O: validated indexes (headers only), streaming reads, streaming shard writes."""
