"""Generation: engines (in-process Hugging Face, OpenAI-compatible HTTP), resumable runs, blind responses."""

from mmsafe.generate.engine import DecodingParams, Engine, GenerationRequest, requests_from_records

__all__ = ["DecodingParams", "Engine", "GenerationRequest", "requests_from_records"]
