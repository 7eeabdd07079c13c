"""Runnable examples of corral in applications."""
