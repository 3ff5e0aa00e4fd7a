"""mode-cl trainables: MoDE adapters, continual-learning methods, losses and the tiny Chameleon."""

__version__ = "0.1.0"
