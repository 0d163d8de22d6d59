"""User-facing layers: the command line and the HTTP control API."""
