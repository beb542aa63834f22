"""lm: deploy large language models on the machine you have and serve them the way users already know."""

__version__ = "0.1.0"
