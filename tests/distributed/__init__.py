"""Worker scripts for tests/test_distributed.py.

Each module runs under `torchrun --nproc_per_node 2` (as `python -m distributed.<module>` with tests/ on the path) and
writes its results, on rank 0, to the folder given on its command line: tensors as safetensors, the rest as JSON.
The same functions run in the test process for the single-process references.
"""
