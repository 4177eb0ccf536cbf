"""The resident model's serving loop: the engine, its scheduler, and how it is set up."""
