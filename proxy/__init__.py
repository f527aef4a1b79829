"""Enforcement proxy: the OpenAI API for Case, pinned to the admitted local model."""
