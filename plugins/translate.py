"""Translate (being written)."""
