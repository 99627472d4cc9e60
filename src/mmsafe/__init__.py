"""mmsafe: make vision-language assistants harmless with preference optimization, and
measure how harmless they are."""

__version__ = "0.1.0"
