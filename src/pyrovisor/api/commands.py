"""Core sub-commands: run, guests, info."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Placeholder until the foundation commands land."""
