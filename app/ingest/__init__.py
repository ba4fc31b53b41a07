"""Turning user documents into passages."""
