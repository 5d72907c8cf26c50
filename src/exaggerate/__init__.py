"""exaggerate: explain image classifiers by progressive exaggeration."""
__version__ = "0.1.0"
