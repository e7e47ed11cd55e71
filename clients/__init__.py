"""Flower ClientApp, tasks and local training."""
