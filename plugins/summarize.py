"""Summarize (being written)."""
