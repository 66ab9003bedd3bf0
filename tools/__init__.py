"""Development tools of laion5b-downloader: the loopback image server and its image assets."""
