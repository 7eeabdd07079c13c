"""A preload module that cannot be imported."""

raise RuntimeError("preload boom: this module refuses to load")
