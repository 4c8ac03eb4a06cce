"""vitboost: fine-tune and benchmark Vision Transformers on one GPU or many."""
__version__ = "0.1.0"
