"""Loading Hugging Face vision-language models, prompts, and the tiny offline model."""

from mmsafe.models.loading import LoadedModel, load_model, load_processor

__all__ = ["LoadedModel", "load_model", "load_processor"]
