"""Kernel benchmark (CPU backend vs torch/oneDNN). Same as `batch-invariant bench kernels`.

    python bench/kernels.py [--quick] [--out bench/results]
"""
import sys

from batch_invariant.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
