"""Live migration: iterative pre-copy with dirty-page tracking, stop-and-copy, and the receiving side."""
