"""Shared code of laion5b-downloader: the scripts at the top level wire these modules together."""

__version__ = "0.1.0"
"""The version of this tool, sent in its User-Agent; pyproject.toml's version is the same."""
