"""Data parallelism: `dp_size` engine replicas, each its own process with its own scheduler
and KV pool, behind one front that routes requests by prefix-cache affinity."""
