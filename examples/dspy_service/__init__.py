"""DSPy programs behind a corral pool: see README.md here and docs/dspy.md."""
