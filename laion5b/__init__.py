"""Shared code of laion5b-downloader: the scripts at the top level wire these modules together."""
