"""A FastAPI service backed by a corral pool: see README.md here."""
