"""Thin Flower app package: the apps live in python_api.engine.flower (installed with fcl-ext)."""
