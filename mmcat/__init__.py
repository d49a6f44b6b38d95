"""mmcat: multimodal (product photo + text) e-commerce product classifiers, from a laptop to a GPU cluster."""
__version__ = "0.1.0"
