"""The Mogrifier LSTM: the readable layer (layer.py), its fast path (fast.py: one autograd node per sequence,
backward through time by hand), the fast path's C++ loops (cpu.cpp, built and loaded by cpu.py) and their
reused CPU buffers (workspace.py)."""
from .layer import MogrifierLSTMLayer, MogrifierRound

__all__ = ["MogrifierLSTMLayer", "MogrifierRound"]
