"""Fakes for the tests: the engine's world in memory (engine.py)."""
