"""Automatic evaluation of trained models: the shapes task, and image sets for FID and CLIP score."""
