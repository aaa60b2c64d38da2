"""Single-run command line: `python -m lmcore train|evaluate ...` (or `lmcore train|evaluate ...`).

Every setting of the config vocabulary is a flag of its own dotted name (`--model.rounds 3`), settable
also from a YAML file (`--config run.yaml`) or as `--set model.rounds=3`. The first version's flags
are accepted too: `--dataset`, `--model-type Mogrify|RNN|SAN`, `--rnn-type`, `--pos-encode`,
`--hidden-size`, `--d-model`, `--heads`, `--depth`, `--gpu`, and `-mode train -run_name X`.
The run name decides the folder: runs/NAME/ holds config.yaml, train.log, metrics.jsonl, last.pt, best.pt
and final.json (see lmcore/run_folder.py).

Everything is checked (settings, device, data, sizes) before runs/NAME/ is created, and a run that fails
before its first epoch ends leaves nothing behind. Exit codes: see `ExitCode`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from . import files
from .checkpoint import saved_config
from .config import (
    DEVICE,
    Config,
    SettingError,
    did_you_mean,
    error_lines,
    error_message,
    field_help,
    flatten,
    make_config,
    parse_override,
    parse_value,
    take_overrides,
)
from .data import Corpus, DataError, load_corpus
from .exitcodes import ExitCode, quiet_when_output_closes, sigterm_as_ctrl_c
from .final import choose_and_test, evaluate_checkpoint
from .run_folder import RUN_FILES, NewRunFolder, RunFolder
from .train import check_fits, resolve_device, train

log = logging.getLogger("lmcore")

MODEL_TYPES = {"mogrify": "mogrifier", "rnn": None, "san": "transformer"}  # None: decided by --rnn-type
LEGACY_ALIASES = {  # a flag of the project's first version -> the config vocabulary
    "dataset": "data.name", "pos_encode": "model.pos_encode", "hidden_size": "model.hidden",
    "d_model": "model.d_model", "heads": "model.heads", "depth": "model.layers",
}
# What a resumed run may change: nothing that changes the model's shapes, the optimiser or the training data.
RESUMABLE = ("train.", "data.dir", "data.eval_batch_size")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


class UsageError(Exception):
    """Bad input from the user: printed as one message, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, not argparse's usage block (which lists every setting of the vocabulary).
        unknown = [a[2:] for a in message.split() if a.startswith("--")]
        if message.startswith("unrecognized arguments") and unknown:
            message += did_you_mean(unknown[0].partition("=")[0])
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(ExitCode.BAD_INPUT)


def positive_int(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text.strip()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (got {files.short_repr(text)})")
    return int(text)


def device_name(text: str) -> str:
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N (got {files.short_repr(text)})")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m lmcore", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    tr = commands.add_parser("train", allow_abbrev=False,
                             help="train one configuration, then evaluate its best checkpoint",
                             usage="%(prog)s --run-name NAME [--config FILE] [--set KEY=VALUE] [--SETTING V] ...")
    tr.add_argument("--run-name", required=True, help="runs/NAME/ holds this run's checkpoints and logs")
    tr.add_argument("--runs-dir", default="runs", help="parent folder of run folders (default: runs)")
    tr.add_argument("--config", help="YAML file of settings (nested sections or dotted names)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting, repeatable")
    tr.add_argument("--resume", action="store_true",
                    help="continue runs/NAME/last.pt with the run's own settings; only train.*, data.dir and "
                         "data.eval_batch_size may be given anew (e.g. more train.epochs)")
    tr.add_argument("--overwrite", action="store_true",
                    help="replace an existing runs/NAME/ (only once the new run has finished its first epoch)")
    tr.add_argument("--test-batch-size", type=positive_int, default=None,
                    help="batch size of the final valid/test evaluation (default: data.eval_batch_size)")
    legacy = tr.add_argument_group("legacy flags (the first version's, accepted as they were)")
    legacy.add_argument("--dataset", choices=["ptb", "wikitext-2", "text"])
    legacy.add_argument("--model-type", type=str.lower, choices=sorted(MODEL_TYPES))
    legacy.add_argument("--rnn-type", type=str.lower, choices=["lstm", "gru", "rnn"], default="lstm")
    legacy.add_argument("--pos-encode", choices=["none", "sinusoidal", "learned"])
    for flag in ("--hidden-size", "--d-model", "--heads", "--depth"):
        legacy.add_argument(flag, type=positive_int)
    legacy.add_argument("--gpu", type=int, help="CUDA device index (negative: CPU)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, text in field_help().items():
        section = name.rpartition(".")[0]
        if section not in groups:
            groups[section] = tr.add_argument_group(f"{section} settings (lmcore/config.py)")
        groups[section].add_argument(f"--{name}", dest=name, metavar="V", default=None, help=text.replace("%", "%%"))

    ev = commands.add_parser("evaluate", allow_abbrev=False, help="valid and test perplexity of a saved checkpoint")
    ev.add_argument("--run-name", help="evaluate runs/NAME/best.pt")
    ev.add_argument("--runs-dir", default="runs")
    ev.add_argument("--checkpoint", help="path of a checkpoint file (instead of --run-name)")
    ev.add_argument("--batch-size", type=positive_int, default=None, help="default: the run's data.eval_batch_size")
    ev.add_argument("--data-dir", help="where the data is (default: the run's data.dir, $LMCORE_DATA_DIR, the cache)")
    ev.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    ev.add_argument("--splits", nargs="+", default=["valid", "test"], choices=["train", "valid", "test"])
    ev.add_argument("--dynamic", action="store_true", help="dynamic evaluation with the run's eval.* settings")
    ev.add_argument("--dynamic-search", action="store_true",
                    help="dynamic evaluation: choose eval.dynamic_lr and _decay on valid, then score test once")
    ev.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                    help="a dynamic-evaluation setting (eval.*), repeatable")
    return parser


def translate_legacy_argv(argv: list[str]) -> list[str]:
    """`-mode train -run_name X -model_type Mogrify` -> `train --run-name X --model-type Mogrify`."""
    if "-mode" not in argv or argv.index("-mode") + 1 >= len(argv):
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


# -- settings ------------------------------------------------------------------------------------------


def file_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted settings of --config (nested sections and dotted keys alike)."""
    if not args.config:
        return {}
    try:
        return flatten(files.read_yaml(args.config))
    except files.FileError as err:
        raise UsageError(f"--config {err}") from None


def flag_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (the legacy flags, the vocabulary's, --set), in that order of precedence."""
    settings: dict[str, Any] = {}
    for flag, name in LEGACY_ALIASES.items():
        if getattr(args, flag) is not None:
            settings[name] = getattr(args, flag)
    if args.model_type:
        settings["model.family"] = MODEL_TYPES[args.model_type] or args.rnn_type
    if args.gpu is not None:
        settings["train.device"] = f"cuda:{args.gpu}" if args.gpu >= 0 else "cpu"
    for name in field_help():
        if getattr(args, name) is not None:
            try:
                settings[name] = parse_value(name, getattr(args, name))
            except ValueError as err:
                raise UsageError(f"--{name}: {err}") from None
    for text in args.set:
        try:
            name, value = parse_override(text)
        except ValueError as err:
            raise UsageError(f"--set {files.short_repr(text)}: {err}") from None
        settings[name] = value
    return settings


def validated(base: Config | dict, settings: dict[str, Any], source: str) -> Config:
    try:
        return make_config(base, settings)
    except ValidationError as err:
        raise UsageError(error_message(error_lines(err, source))) from None
    except ValueError as err:  # a setting below a value (`model: 3` then `model.rounds`)
        raise UsageError(f"{source}: {err}") from None


def new_config(from_file: dict[str, Any], from_flags: dict[str, Any], config_path: str | None) -> Config:
    base = validated({}, from_file, config_path or "--config")  # a bad file is named as such
    return validated(base, from_flags, "command line")


def resumed_config(last: Path, given: dict[str, Any]) -> Config:
    """The run's own config (from its checkpoint) with the settings given now; refuses any that would change
    the model or the data."""
    saved = saved_config(last)
    config = validated(saved, given, "command line")
    changed = [name for name in given if not name.startswith(RESUMABLE) and saved.flat()[name] != config.flat()[name]]
    if changed:
        was = ", ".join(f"{name}={saved.flat()[name]!r} (given {config.flat()[name]!r})" for name in changed)
        raise UsageError(f"--resume: {last.parent} was trained with {was}; a resumed run keeps its model, "
                         f"optimiser and data, and may change only train.*, data.dir and data.eval_batch_size. "
                         f"Start a new run (another --run-name) to change the others.")
    return config


def preflight(config: Config, test_batch_size: int | None) -> Corpus:
    """Everything that can fail before the first step, checked before anything is written."""
    resolve_device(config.train.device)
    corpus = load_corpus(config.data.name, config.data.dir)
    check_fits(config, corpus, test_batch_size)
    return corpus


# -- the run folder --------------------------------------------------------------------------------------


def run_folder(runs_dir: str, name: str) -> RunFolder:
    if not RUN_NAME.fullmatch(name) or ".." in name:
        raise UsageError(f"--run-name {files.short_repr(name)}: expected one folder name of letters, digits and "
                         f". _ + - (starting with a letter or digit, no '..')")
    if Path(runs_dir).exists() and not Path(runs_dir).is_dir():
        raise UsageError(f"--runs-dir {runs_dir}: not a folder")
    return RunFolder(Path(runs_dir) / name)


# -- commands -----------------------------------------------------------------------------------------------


def run_train(args: argparse.Namespace) -> int:
    run = run_folder(args.runs_dir, args.run_name)
    run_dir, last = run.path, run.last
    from_file, from_flags = file_settings(args), flag_settings(args)
    if args.resume and args.overwrite:
        raise UsageError("give only one of --resume (continue the run) and --overwrite (replace it)")
    if args.resume:
        if not last.is_file():
            raise UsageError(f"--resume: {last} does not exist (no epoch of {run_dir} finished)")
        config = resumed_config(last, from_file | from_flags)
    else:
        if run_dir.exists() and not args.overwrite:
            raise UsageError(f"{run_dir} already exists: pass --resume to continue it, --overwrite to replace it, "
                             f"or choose another --run-name")
        if run_dir.exists() and not run.holds_a_run():
            raise UsageError(f"--overwrite: {run_dir} is not an lmcore run folder ({run.config.name} with one of "
                             f"{', '.join(RUN_FILES)}); refusing to delete it")
        config = new_config(from_file, from_flags, args.config)
    corpus = preflight(config, args.test_batch_size)

    new = NewRunFolder(run_dir)
    if not args.resume:
        new.create()
    file_log = None
    try:
        files.write_text(run.config, yaml.safe_dump(config.model_dump(), sort_keys=False))
        file_log = logging.FileHandler(run.log)
        file_log.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logging.getLogger().addHandler(file_log)
        return train_and_evaluate(args, config, corpus, run, new)
    except KeyboardInterrupt:
        new.abandon()  # a no-op once an epoch has finished
        hint = (f"run the same command with --resume to continue from {last}" if last.is_file()
                else "nothing was kept (no epoch had finished)")
        print(f"\ninterrupted: {hint}", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BaseException:
        new.abandon()
        raise
    finally:
        if file_log is not None:
            logging.getLogger().removeHandler(file_log)
            file_log.close()


def train_and_evaluate(args: argparse.Namespace, config: Config, corpus: Corpus, run: RunFolder,
                       new: NewRunFolder) -> int:
    last, best = run.last, run.best
    best_loss = math.inf

    def report(metrics, save_checkpoint) -> None:
        nonlocal best_loss
        save_checkpoint(last)
        with open(run.metrics, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if metrics["valid_loss"] < best_loss:
            best_loss = metrics["valid_loss"]
            files.copy_file(last, best)
        new.started()

    if args.resume and run.metrics.is_file():
        history = [json.loads(line) for line in run.metrics.read_text().splitlines() if line]
        best_loss = min((m["valid_loss"] for m in history), default=math.inf)
    summary = train(config, report=report, resume_from=last if args.resume else None, corpus=corpus)
    log.info("training %s after %d epochs: best valid ppl %.2f", summary["status"], summary["epochs"],
             summary["best_valid_ppl"])
    if best.is_file():
        scores, _ = evaluate_checkpoint(best, ("valid", "test"), batch_size=args.test_batch_size,
                                        device=config.train.device, data_dir=config.data.dir)
        batch_size = args.test_batch_size or config.data.eval_batch_size
        for line in table(best, scores, f"batch size {batch_size}"):
            log.info("%s", line)
        final = {"checkpoint": str(best), "batch_size": batch_size, **scores, "status": summary["status"]}
        files.write_text(run.final, json.dumps(final, indent=2))
    if summary["status"] == "diverged":
        log.error("the run diverged at epoch %d: no usable result beyond best.pt (if any)", summary["epochs"])
        return ExitCode.NO_RESULT
    return ExitCode.OK


def table(path: Path, scores: dict[str, dict[str, float]], how: str) -> list[str]:
    """The printed valid/test table; `how` says how it was scored (batch size, or the dynamic evaluation)."""
    lines = [f"{'split':<8}{'loss':>10}{'ppl':>12}{'tokens':>12}   ({path}, {how})"]
    lines += [f"{split:<8}{r['loss']:>10.4f}{r['ppl']:>12.2f}{r['tokens']:>12,}" for split, r in scores.items()]
    return lines


def run_evaluate(args: argparse.Namespace) -> int:
    if bool(args.run_name) == bool(args.checkpoint):
        raise UsageError("evaluate: give exactly one of --run-name or --checkpoint")
    path = Path(args.checkpoint) if args.checkpoint else run_folder(args.runs_dir, args.run_name).best
    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint")
    dynamic = dynamic_settings(args)
    if args.dynamic_search:
        result = choose_and_test(path, args.data_dir, args.device, dynamic)
        print("dynamic evaluation, lr and decay chosen on valid: " + json.dumps(result))
        return ExitCode.OK
    scores, config = evaluate_checkpoint(path, tuple(args.splits), batch_size=args.batch_size,
                                         data_dir=args.data_dir, device=args.device,
                                         dynamic=dynamic if args.dynamic else None)
    how = f"batch size {args.batch_size or config.data.eval_batch_size}"
    if args.dynamic:
        e = config.eval
        how = (f"dynamic evaluation: {e.dynamic_method}, lr {e.dynamic_lr:g}, decay {e.dynamic_decay:g}, "
               f"bptt {e.dynamic_bptt}, batch size {e.dynamic_batch_size}")
    print("\n".join(table(path, scores, how)))
    return ExitCode.OK


def dynamic_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`evaluate --set eval.dynamic_lr=...` -> {"eval.dynamic_lr": ...}, checked against the vocabulary."""
    if args.set and not (args.dynamic or args.dynamic_search):
        raise UsageError("evaluate: --set only applies with --dynamic or --dynamic-search")
    try:
        overrides = dict(parse_override(text) for text in args.set)
        make_config({}, overrides)
    except ValidationError as err:
        raise UsageError(error_message(error_lines(err, "--set"))) from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    wrong = [name for name in overrides if not name.startswith("eval.")]
    if wrong:
        raise UsageError(f"evaluate --set: only eval.* settings apply to a trained model, not {', '.join(wrong)}")
    return overrides


@quiet_when_output_closes
@sigterm_as_ctrl_c
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)  # also when the caller configured logging already (train.log needs these lines)
    try:
        argv, overrides = take_overrides(translate_legacy_argv(list(sys.argv[1:] if argv is None else argv)))
        args = build_parser().parse_args(argv)
        args.set += overrides  # both commands take --set
    except SystemExit as done:  # --help, or a malformed command line (already reported)
        return done.code if isinstance(done.code, int) else ExitCode.BAD_INPUT
    try:
        return int(run_train(args) if args.command == "train" else run_evaluate(args))
    except (UsageError, DataError, SettingError, files.FileError) as err:  # CheckpointError is a DataError
        print(f"error: {err}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
