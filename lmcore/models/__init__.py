"""Model families behind one constructor: `build_model(config, vocab_size)`."""
from .lm import LanguageModel, build_model, count_parameters, solve_budget
from .mogrifier import MogrifierLSTMLayer
from .rnn import detach_state

__all__ = ["LanguageModel", "MogrifierLSTMLayer", "build_model", "count_parameters", "detach_state", "solve_budget"]
