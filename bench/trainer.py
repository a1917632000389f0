"""Trainer benchmark (fwd+bwd tokens/s vs HF transformers). Same as `batch-invariant bench trainer`.

    python bench/trainer.py [--out bench/results] [--model DIR]
"""
import sys

from batch_invariant.bench.trainer import main

if __name__ == "__main__":
    sys.exit(main())
