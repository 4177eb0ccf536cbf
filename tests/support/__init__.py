"""Test support: real processes (redis-server, workers, Flower) owned by fixtures."""
