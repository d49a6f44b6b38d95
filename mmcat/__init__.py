"""mmcat: multimodal (product photo + text) e-commerce product classifiers, from a laptop to a GPU cluster.

``from mmcat import Classifier`` is the Python API of a trained model (:mod:`mmcat.classifier`); it is imported
on first use, so ``mmcat --help`` and ``mmcat pack`` do not load torch.
"""
__version__ = "0.1.0"
__all__ = ["Classifier", "Prediction", "__version__"]


def __getattr__(name: str):
    if name in ("Classifier", "Prediction"):
        from mmcat import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'mmcat' has no attribute {name!r}")
