"""Benchmarks of flashattention against PyTorch's attention backends (the README's Benchmarks section).

`registry` holds the shapes and the providers, `run` the runner (`python -m benchmarks.run --help`, or
`python -m flashattention bench`), `decode` its decode suite (`--suite decode`), `report` the table, JSON,
plot and RESULTS.md output.
"""
