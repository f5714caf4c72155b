"""Command-line entry points, run from the pack folder: `python -m cli.train ...`, `python -m cli.run_example ...`."""
