"""Modality interpretation: text preference data -> multimodal preference data.

``build_data(BuildConfig(...))`` runs parse -> entities -> images -> rewrite -> emit;
see :mod:`mmsafe.synthesis.pipeline`. Each stage is chosen by name and can be replaced.
"""

from mmsafe.synthesis.config import BuildConfig
from mmsafe.synthesis.pipeline import BuildSummary, Stages, build_data, make_stages

__all__ = ["BuildConfig", "BuildSummary", "Stages", "build_data", "make_stages"]
