"""First-stage indexes over a store's global descriptors: the Index protocol (base.py) and the exact streamed
search (exact.py). Approximate backends (FAISS) implement the same protocol."""
from .base import Index
from .exact import ExactIndex

__all__ = ["ExactIndex", "Index"]
