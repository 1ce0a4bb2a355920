"""Prefect flows: one flow per file, composing tasks from ``tasks/``."""
