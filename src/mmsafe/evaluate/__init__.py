"""Safety evaluation: judges, benchmark loaders, metrics, pairwise accuracy, reports.

Submodules import their heavy dependencies (transformers, matplotlib, httpx) lazily, so
``import mmsafe.evaluate`` stays cheap.
"""
