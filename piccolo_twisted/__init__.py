"""Piccolo field spectrometer server on Twisted."""

__version__ = "0.1.0"
