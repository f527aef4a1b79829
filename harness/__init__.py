"""Harness: gates before Case starts, a run through the proxy, and an evidence-only report."""
