"""Benchmarks of flashattention against PyTorch's attention backends (DESIGN.md section 4).

`registry` holds the shapes and the providers, `run` the runner (`python -m benchmarks.run --help`, or
`python -m flashattention bench`), `decode` its decode suite (`--suite decode`), `report` the table, JSON,
plot and RESULTS.md output.
"""
