"""One module per CLI verb; `hwr_dist/cli.py` only wires them to Typer."""
