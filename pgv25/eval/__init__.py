"""Automatic evaluation of trained models (the shapes task)."""
