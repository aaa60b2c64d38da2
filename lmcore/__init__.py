"""lmcore: PTB / WikiText-2 language modelling with the Mogrifier LSTM, RNN baselines and a Transformer.

    corpus = lmcore.load_corpus("ptb")
    model = lmcore.build_model(config, len(corpus.vocab))
    summary = lmcore.train(config, report=callback)
    model, vocab, config = lmcore.load_checkpoint("runs/NAME/best.pt")
    dynamic = lmcore.dynamic.prepare(model, corpus.train, config.eval)       # dynamic evaluation
    lmcore.evaluate(model, corpus.test, eos_id=vocab.eos_id, dynamic=dynamic)
"""
from . import dynamic
from .checkpoint import CheckpointError, Loaded, load_checkpoint
from .config import Config, make_config
from .data import Corpus, DataError, Vocab, load_corpus
from .evaluation import evaluate
from .final import evaluate_checkpoint
from .models import build_model
from .train import train

__all__ = ["CheckpointError", "Config", "Corpus", "DataError", "Loaded", "Vocab", "build_model", "dynamic", "evaluate",
           "evaluate_checkpoint", "load_checkpoint", "load_corpus", "make_config", "train"]
