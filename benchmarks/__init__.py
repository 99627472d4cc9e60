"""Side-by-side performance benchmarks: ``python -m benchmarks.<name> [--quick] [--json PATH]``."""
