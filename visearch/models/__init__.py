"""Describers: one module per model family (see registry.py for names)."""
