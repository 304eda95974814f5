"""xmlsparse: extreme multi-label classification with sparse fixed fan-in output layers."""

__version__ = "0.1.0"
