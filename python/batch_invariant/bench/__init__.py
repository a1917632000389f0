"""Benchmarks shipped with the package (``batch-invariant bench ...``); bench/ holds thin scripts
and the committed results."""
