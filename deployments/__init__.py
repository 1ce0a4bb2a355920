"""Prefect deployments of the flows, declared as data in ``deployments.yaml``."""
