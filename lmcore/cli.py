"""Single-run command line: `python -m lmcore train|evaluate ...`.

Every setting of the config vocabulary is a flag of its own dotted name (`--model.rounds 3`), settable
also from a YAML file (`--config run.yaml`) or as `--set model.rounds=3`. The seed's spelling is
accepted too: `--dataset`, `--model-type Mogrify|RNN|SAN`, `--rnn-type`, `--pos-encode`,
`--hidden-size`, `--d-model`, `--heads`, `--depth`, `--gpu`, and `-mode train -run_name X`.
The run name decides the folder: runs/NAME/ holds config.yaml, train.log, metrics.jsonl, last.pt, best.pt.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import Config, describe_error, field_names, flatten, make_config, parse_override, parse_value
from .data import DataError
from .dynamic import choose_and_test
from .train import evaluate_checkpoint, train

log = logging.getLogger("lmcore")

MODEL_TYPES = {"mogrify": "mogrifier", "rnn": None, "san": "transformer"}  # None: decided by --rnn-type
SEED_ALIASES = {  # the seed's flag -> the config vocabulary
    "dataset": "data.name", "pos_encode": "model.pos_encode", "hidden_size": "model.hidden",
    "d_model": "model.d_model", "heads": "model.heads", "depth": "model.layers",
}


class UsageError(Exception):
    """Bad input from the user: printed as one message, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmcore", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    tr = commands.add_parser("train", help="train one configuration, then evaluate its best checkpoint")
    tr.add_argument("--run-name", required=True, help="runs/NAME/ holds this run's checkpoints and logs")
    tr.add_argument("--runs-dir", default="runs", help="parent folder of run folders (default: runs)")
    tr.add_argument("--config", help="YAML file of settings (nested sections or dotted names)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting, repeatable")
    tr.add_argument("--resume", action="store_true", help="continue runs/NAME/last.pt")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing runs/NAME/")
    tr.add_argument("--test-batch-size", type=int, default=None,
                    help="batch size of the final valid/test evaluation (default: data.eval_batch_size)")
    seed = tr.add_argument_group("the seed's options")
    seed.add_argument("--dataset", choices=["ptb", "wikitext-2", "text"])
    seed.add_argument("--model-type", type=str.lower, choices=sorted(MODEL_TYPES))
    seed.add_argument("--rnn-type", type=str.lower, choices=["lstm", "gru", "rnn"], default="lstm")
    seed.add_argument("--pos-encode", choices=["none", "sinusoidal", "learned"])
    for flag in ("--hidden-size", "--d-model", "--heads", "--depth"):
        seed.add_argument(flag, type=int)
    seed.add_argument("--gpu", type=int, help="CUDA device index (negative: CPU)")
    settings = tr.add_argument_group("settings (the config vocabulary; defaults from lmcore/config.py)")
    for name in field_names():
        settings.add_argument(f"--{name}", dest=name, metavar="V", default=None)

    ev = commands.add_parser("evaluate", help="valid and test perplexity of a saved checkpoint")
    ev.add_argument("--run-name", help="evaluate runs/NAME/best.pt")
    ev.add_argument("--runs-dir", default="runs")
    ev.add_argument("--checkpoint", help="path of a checkpoint file (instead of --run-name)")
    ev.add_argument("--batch-size", type=int, default=None, help="default: the run's data.eval_batch_size")
    ev.add_argument("--data-dir", help="where the data is (default: the run's data.dir / $LMCORE_DATA_DIR)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--splits", nargs="+", default=["valid", "test"], choices=["train", "valid", "test"])
    ev.add_argument("--dynamic", action="store_true", help="dynamic evaluation with the run's eval.* settings")
    ev.add_argument("--dynamic-search", action="store_true",
                    help="dynamic evaluation: choose eval.dynamic_lr and _decay on valid, then score test once")
    ev.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                    help="a dynamic-evaluation setting (eval.*), repeatable")
    return parser


def translate_seed_argv(argv: list[str]) -> list[str]:
    """`-mode train -run_name X -model_type Mogrify` -> `train --run-name X --model-type Mogrify`."""
    if "-mode" not in argv:
        return argv
    i = argv.index("-mode")
    mode, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    flags = [f"--{a[1:].replace('_', '-')}" if a.startswith("-") and not a.startswith("--") and len(a) > 2
             and not _is_number(a) else a for a in rest]
    return [mode] + flags


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def config_from_args(args: argparse.Namespace) -> Config:
    tree: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise UsageError(f"{path}: expected a mapping of settings")
    overrides: dict[str, Any] = {}
    for flag, name in SEED_ALIASES.items():
        if getattr(args, flag) is not None:
            overrides[name] = getattr(args, flag)
    if args.model_type:
        overrides["model.family"] = MODEL_TYPES[args.model_type] or args.rnn_type
    if args.gpu is not None:
        overrides["train.device"] = f"cuda:{args.gpu}" if args.gpu >= 0 else "cpu"
    try:
        for name in field_names():
            if getattr(args, name) is not None:
                overrides[name] = parse_value(name, getattr(args, name))
        overrides.update(parse_override(text) for text in args.set)
        # flatten() accepts nested sections and dotted keys alike in the file.
        return make_config({}, flatten(tree) | overrides)
    except ValidationError as err:
        raise UsageError(describe_error(err, args.config or "command line")) from None
    except ValueError as err:
        raise UsageError(str(err)) from None


def run_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    run_dir = Path(args.runs_dir) / args.run_name
    last = run_dir / "last.pt"
    if run_dir.exists() and not (args.resume or args.overwrite):
        raise UsageError(f"{run_dir} already exists: pass --resume to continue it, --overwrite to replace it, "
                         f"or choose another --run-name")
    if args.resume and not last.is_file():
        raise UsageError(f"--resume: {last} does not exist")
    if args.overwrite and not args.resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    file_log = logging.FileHandler(run_dir / "train.log")
    logging.getLogger().addHandler(file_log)
    try:
        return train_and_evaluate(args, config, run_dir)
    finally:
        logging.getLogger().removeHandler(file_log)
        file_log.close()


def train_and_evaluate(args: argparse.Namespace, config: Config, run_dir: Path) -> int:
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    best_loss = math.inf

    def report(metrics: dict[str, Any], save_checkpoint) -> None:
        nonlocal best_loss
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        save_checkpoint(last)
        if metrics["valid_loss"] < best_loss:
            best_loss = metrics["valid_loss"]
            shutil.copyfile(last, best)

    if args.resume:
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        best_loss = min((m["valid_loss"] for m in history), default=math.inf)
    summary = train(config, report=report, resume_from=last if args.resume else None)
    log.info("training %s after %d epochs: best valid ppl %.2f", summary["status"], summary["epochs"],
             summary["best_valid_ppl"])
    if best.is_file():
        final = print_evaluation(best, ["valid", "test"], args.test_batch_size, None, config.train.device)
        (run_dir / "final.json").write_text(json.dumps(final | {"status": summary["status"]}, indent=2))
    return 0


def print_evaluation(path: Path, splits: list[str], batch_size: int | None, data_dir: str | None,
                     device: str, dynamic: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on `splits` and print a small table; returns what was printed."""
    scores, config = evaluate_checkpoint(path, tuple(splits), batch_size=batch_size, data_dir=data_dir, device=device,
                                         dynamic=dynamic)
    batch_size = batch_size or config.data.eval_batch_size
    how = f"batch size {batch_size}"
    if dynamic is not None:
        e = config.eval
        how = (f"dynamic evaluation: {e.dynamic_method}, lr {e.dynamic_lr:g}, decay {e.dynamic_decay:g}, "
               f"bptt {e.dynamic_bptt}, batch size {e.dynamic_batch_size}")
    print(f"{'split':<8}{'loss':>10}{'ppl':>12}{'tokens':>12}   ({path}, {how})")
    for split, r in scores.items():
        print(f"{split:<8}{r['loss']:>10.4f}{r['ppl']:>12.2f}{r['tokens']:>12,}")
    return {"checkpoint": str(path), "batch_size": batch_size, **scores}


def run_evaluate(args: argparse.Namespace) -> int:
    if bool(args.run_name) == bool(args.checkpoint):
        raise UsageError("evaluate: give exactly one of --run-name or --checkpoint")
    path = Path(args.checkpoint) if args.checkpoint else Path(args.runs_dir) / args.run_name / "best.pt"
    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint")
    dynamic = dynamic_settings(args)
    if args.dynamic_search:
        result = choose_and_test(path, args.data_dir, args.device, dynamic)
        print("dynamic evaluation, lr and decay chosen on valid: " + json.dumps(result))
        return 0
    print_evaluation(path, args.splits, args.batch_size, args.data_dir, args.device,
                     dynamic if args.dynamic else None)
    return 0


def dynamic_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`evaluate --set eval.dynamic_lr=...` -> {"eval.dynamic_lr": ...}, checked against the vocabulary."""
    if args.set and not (args.dynamic or args.dynamic_search):
        raise UsageError("evaluate: --set only applies with --dynamic or --dynamic-search")
    try:
        overrides = dict(parse_override(text) for text in args.set)
        make_config({}, overrides)
    except ValidationError as err:
        raise UsageError(describe_error(err, "--set")) from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    wrong = [name for name in overrides if not name.startswith("eval.")]
    if wrong:
        raise UsageError(f"evaluate --set: only eval.* settings apply to a trained model, not {', '.join(wrong)}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(translate_seed_argv(list(sys.argv[1:] if argv is None else argv)))
    try:
        return run_train(args) if args.command == "train" else run_evaluate(args)
    except (UsageError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
