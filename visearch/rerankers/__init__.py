"""Rerankers: reorder a global shortlist (SuperGlobal refinement, AMES transformer)."""
