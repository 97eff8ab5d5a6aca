"""pgv25: fine-tune Playground v2.5 with its EDM schedule and export diffusers pipelines."""

__version__ = "0.1.0"
