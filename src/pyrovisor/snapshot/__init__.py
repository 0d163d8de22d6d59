"""Snapshots: machine state files, memory files (full and diff), taking and restoring them."""
