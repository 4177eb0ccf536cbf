"""Development scripts: setup, the demo, and the local stack they start (not library code)."""
