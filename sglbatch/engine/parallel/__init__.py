"""Tensor parallelism (`tp_size`): shard planning (shard.py), the process group and its
collectives (group.py), rank 0's handles on the worker processes (peers.py), the worker
process loop (worker.py) and starting them all (launch.py).

Kept free of imports: worker.py imports the model runner, which imports group.py and
shard.py, so importing this package must not pull worker.py in.
"""
