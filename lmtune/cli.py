"""The command line of tune.py.

    python tune.py experiments/ptb_mogrify.yaml [--set optim.lr=1e-3 --set trials=8] [--restart] [--address ...]
    python tune.py check experiments/ptb_mogrify.yaml      # validate and show the search space; runs nothing
    python tune.py report results/ptb_mogrify             # tables + test evaluation of the best checkpoints
    python tune.py compare results/ptb_mogrify results/ptb_lstm results/ptb_transformer
    python tune.py export-best results/ptb_mogrify --out best.yaml   # for: python -m lmcore train --config best.yaml
    python tune.py runs runs/ptb_lstm_seed1 runs/ptb_lstm_seed2 runs/ptb_lstm_seed3   # single runs, mean ± sd
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmcore import files
from lmcore.config import Config, take_overrides
from lmcore.data import DataError
from lmcore.exitcodes import ExitCode, quiet_when_output_closes, sigterm_as_ctrl_c
from lmtune.checks import check_fits
from lmtune.experiment import Experiment, load_experiment
from lmtune.schema import ExperimentError

COMMANDS = ("run", "check", "report", "compare", "export-best", "runs")
WIDTH_DRAWS = 16  # random draws of the space over which `check` shows each family's width


@quiet_when_output_closes
@sigterm_as_ctrl_c
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "run")  # `tune.py EXPERIMENT.yaml` means run it
    argv, overrides = take_overrides(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if overrides and not hasattr(args, "set"):
        parser.error(f"{args.command} takes no --set")
    args.set = getattr(args, "set", []) + overrides
    try:
        return args.handler(args)
    except (ExperimentError, DataError) as err:  # nothing was launched
        print(f"error: {err}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume.", file=sys.stderr)
        return ExitCode.INTERRUPTED


def run(args: argparse.Namespace) -> int:
    num_cpus = _num_cpus(args.num_cpus)
    exp = load_experiment(args.experiment, args.set)  # everything validated before Ray starts
    check_fits(exp.space, exp.base, exp.source)
    from lmtune.driver import run_experiment
    from lmtune.report import report

    finished = run_experiment(
        exp,
        restart=args.restart,
        address=args.address,
        num_cpus=num_cpus,
        dashboard=not args.no_dashboard,
        dashboard_host=args.dashboard_host,
        dashboard_port=args.dashboard_port,
    )
    if not finished:
        print(f"\n{exp.name} was interrupted: run the same command again to resume it.", file=sys.stderr)
        return ExitCode.INTERRUPTED
    summary = report(exp.folder)  # the test split is touched here, once the search is over
    _print_summary(exp.folder, summary)
    if summary["best"] is None:
        counts = ", ".join(f"{n} {status}" for status, n in summary["status"].items())
        print(f"\n{exp.name}: no usable trial ({counts}); see {exp.folder}/trials.md", file=sys.stderr)
        return ExitCode.NO_RESULT
    return ExitCode.OK


def check(args: argparse.Namespace) -> int:
    """Validate everything `run` validates (the CPU count, the experiment, the corpus it trains on); print what
    would run."""
    _num_cpus(None)
    exp = load_experiment(args.experiment, args.set)
    check_fits(exp.space, exp.base, exp.source)
    print(f"{exp.source}: valid. {exp.spec.trials} trials of {exp.spec.dataset}, folder {exp.folder}")
    print("search space:\n  " + exp.space.describe().replace("\n", "\n  "))
    if exp.pinned:
        print("pinned with --set (fixed for every trial, never searched):\n" + _lines(exp.pinned))
    names = {p.key: p.name for p in exp.space.params}  # the settings' own names, not Optuna's aliases
    for i, point in enumerate(exp.start_points):
        settings = {names[key]: value for key, value in point.items()}
        print(f"start_from[{i}] (tried first; the settings it leaves out are sampled):\n" + _lines(settings))
    defaults = Config().flat()
    shown = {"data.name"} | ({"model.family"} if "model.family" in exp.space.constants else set())
    changed = {k: v for k, v in exp.base.flat().items() if v != defaults[k] or k in shown}
    print("fixed settings (those that differ from lmcore's defaults; trials also get train.threads and "
          "train.device from resources):\n" + _lines(changed))
    widths = _widths(exp)
    if widths:
        print(f"width solved from model.params_budget={exp.base.model.params_budget:,} "
              f"(over {WIDTH_DRAWS} draws of the space):\n" + _lines(widths))
    return ExitCode.OK


def _widths(exp: Experiment) -> dict[str, str]:
    """The width (hidden; d_model for the transformer) each family gets, as a range over random draws."""
    from lmcore.data import DATASETS
    from lmcore.models.lm import solve_budget

    if exp.base.model.params_budget is None:
        return {}
    vocab = DATASETS[exp.spec.dataset].vocab_size
    if vocab is None:
        return {"all families": "solved per trial once the corpus is read (its vocabulary size is not known yet)"}
    seen: dict[str, set[int]] = {}
    for settings in exp.space.draw(WIDTH_DRAWS):
        model = solve_budget(exp.base.updated(settings).model, vocab)
        width = model.d_model if model.family == "transformer" else model.hidden
        seen.setdefault(model.family, set()).add(width)
    name = {"transformer": "d_model"}
    return {family: f"{name.get(family, 'hidden')} {min(w)}" + (f"..{max(w)}" if len(w) > 1 else "")
            for family, w in seen.items()}


def _lines(settings: dict) -> str:
    return "\n".join(f"  {k}: {v}" for k, v in settings.items())


def report_command(args: argparse.Namespace) -> int:
    from lmtune.report import report

    folder = _experiment_folder(args.folder)
    _print_summary(folder, report(folder, evaluate=not args.no_eval))
    return 0


def _keep_existing(paths: list[Path], force: bool) -> None:
    """Refuse, before anything is written, a path no file can be written to (a folder, one in /proc, a folder
    that cannot be written), and to overwrite a user's file unless --force."""
    for path in paths:
        problem = files.why_unwritable(path)
        if problem:
            raise ExperimentError(f"--out {path} {problem}; choose another --out")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ExperimentError(f"{', '.join(existing)}: exists; pass --force to overwrite, or --out another name")


def compare_command(args: argparse.Namespace) -> int:
    from lmtune import plots
    from lmtune.report import compare, comparison_markdown, pairs_file
    from lmtune.results import load_results, pairs_frame

    folders = [_experiment_folder(f) for f in args.folders]
    out = Path(args.out) if args.out else folders[0].parent / "comparison"
    if args.out:  # the default, beside the experiments, is ours to rewrite; a file the user named is not
        _keep_existing([out.with_suffix(s) for s in (".md", ".csv", ".png")] + [pairs_file(out)], args.force)
    table = compare(folders)
    pairs = pairs_frame(folders)  # report.seeds: each pair's difference with Welch's interval
    figure = plots.comparison([load_results(f) for f in folders])  # everything read before anything is written
    written = [out.with_suffix(".md"), out.with_suffix(".csv"), out.with_suffix(".png")] + [pairs_file(out)] * bool(
        len(pairs))
    files.write_text(out.with_suffix(".csv"), table.to_csv(index=False))
    files.write_text(out.with_suffix(".md"), comparison_markdown(table, pairs))
    if len(pairs):
        files.write_text(pairs_file(out), pairs.to_csv(index=False))
    plots.save_png(figure, out.with_suffix(".png"))
    print(comparison_markdown(table, pairs), end="")
    print(f"\nwritten: {', '.join(map(str, written))}")
    return 0


def export_best(args: argparse.Namespace) -> int:
    """The best trial's lmcore config (the model as built, the settings its family reads) as a YAML file that
    `python -m lmcore train --config` reruns."""
    from lmtune.results import config_yaml, load_results

    out = Path(args.out)
    _keep_existing([out], args.force)
    results = load_results(_experiment_folder(args.folder))
    ranked = results.ranked()
    if args.family:
        ranked = ranked[ranked["family"] == args.family]
    if ranked.empty:
        families = ", ".join(sorted(results.ranked()["family"].unique())) or "none"
        raise ExperimentError(f"{args.folder}: no finished trial{' of family ' + args.family if args.family else ''}"
                              f" to export (families with one: {families})")
    best = ranked.iloc[0]
    rerun = f"python -m lmcore train --run-name {results.name}_{best['trial_id']} --config {out}"
    header = (f"# The best {best['family']} trial ({best['trial_id']}, best valid ppl {best['best_valid_ppl']:.2f}) "
              f"of {results.folder}\n# rerun: {rerun}\n")
    files.write_text(out, header + config_yaml(*results.built_config(best["trial_id"])))
    print(f"written: {out}\nrerun it (add --set train.epochs=N or train.seed=S to change it): {rerun}")
    return 0


def runs_command(args: argparse.Namespace) -> int:
    """The table of single lmcore runs, and per config the mean ± standard deviation over its seeds."""
    from lmtune.single_runs import RUN_COLUMNS, load_runs, seed_groups
    from lmtune.table_files import markdown

    runs = load_runs(args.folders)
    print(markdown(runs[RUN_COLUMNS]))
    print("\nper config (runs equal apart from the seed), over its finished runs: mean and sample standard deviation")
    groups = seed_groups(runs)
    print(markdown(groups) if len(groups) else "(no finished run: each is listed above with its best valid so far)")
    return 0


def _print_summary(folder: Path, summary: dict) -> None:
    """The table of what `report` just wrote, from the summary it returned."""
    from lmtune.results import summary_frame
    from lmtune.table_files import markdown

    print(f"\n{summary['experiment']}: {summary['trials']} trials, {summary['status']}")
    print(markdown(summary_frame([summary])))
    print(f"\ntables, figures and summary: {folder}/summary.md (trials, top_k, best_per_family as .md/.csv)")


def _experiment_folder(path: str) -> Path:
    """An experiment folder, its snapshot readable (ExperimentError naming what is not), before anything is written."""
    from lmtune.layout import ray_folder
    from lmtune.results import read_snapshot

    folder = Path(path)
    if not folder.is_dir():
        raise ExperimentError(f"{path}: no such experiment folder")
    if not any(ray_folder(folder).glob("experiment_state-*.json")):
        raise ExperimentError(f"{path}: not an experiment folder (no Ray experiment state in it yet)")
    read_snapshot(folder)
    return folder.resolve()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tune.py", description="Hyperparameter search for neural language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    def experiment_command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("experiment", help="experiments/*.yaml")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a setting: lmcore names (model.hidden=32) or experiment keys (trials=8)")
        sub.set_defaults(handler=handler)
        return sub

    run_parser = experiment_command("run", run, "run or resume an experiment (the default command)")
    run_parser.add_argument("--restart", action="store_true", help="delete the experiment's folder and start afresh")
    run_parser.add_argument("--address", default=None, help="an existing Ray cluster (else $RAY_ADDRESS, else local)")
    run_parser.add_argument("--num-cpus", default=None, help="CPUs of the local Ray (default: all; $LMTUNE_NUM_CPUS)")
    run_parser.add_argument("--no-dashboard", action="store_true", default=os.environ.get("LMTUNE_DASHBOARD") == "0",
                            help="do not start Ray's dashboard ($LMTUNE_DASHBOARD=0)")
    run_parser.add_argument("--dashboard-host", default="127.0.0.1", help="0.0.0.0 exposes it to the network")
    run_parser.add_argument("--dashboard-port", type=int, default=8265)
    experiment_command("check", check, "validate an experiment and print its search space")

    report_parser = commands.add_parser("report", help="tables and test evaluation of an experiment folder")
    report_parser.add_argument("folder")
    report_parser.add_argument("--no-eval", action="store_true", help="tables only: skip the test evaluation")
    report_parser.set_defaults(handler=report_command)

    compare_parser = commands.add_parser("compare", help="one table over several experiment folders")
    compare_parser.add_argument("folders", nargs="+")
    compare_parser.add_argument("--out", default=None,
                                help="file stem for .md/.csv/.png (default: <storage>/comparison, rewritten "
                                "each time); existing files of a stem you name are kept unless --force")
    compare_parser.add_argument("--force", action="store_true", help="overwrite the --out files if they exist")
    compare_parser.set_defaults(handler=compare_command)

    export_parser = commands.add_parser("export-best", help="the best trial's config, for `python -m lmcore train`")
    export_parser.add_argument("folder")
    export_parser.add_argument("--family", default=None, help="the best trial of this model family")
    export_parser.add_argument("--out", default="best.yaml", help="the YAML file to write (default: best.yaml)")
    export_parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    export_parser.set_defaults(handler=export_best)

    runs_parser = commands.add_parser("runs", help="a table of single runs of `python -m lmcore train`, with the "
                                      "mean ± sd over seeds of each config")
    runs_parser.add_argument("folders", nargs="+", metavar="RUN_FOLDER", help="runs/NAME folders")
    runs_parser.set_defaults(handler=runs_command)
    return parser


def _num_cpus(flag: str | None) -> int | None:
    """--num-cpus, else $LMTUNE_NUM_CPUS, else None (all): a whole number of at least 1."""
    text, where = (flag, "--num-cpus") if flag is not None else (os.environ.get("LMTUNE_NUM_CPUS"), "LMTUNE_NUM_CPUS")
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ExperimentError(f"{where}: expected a whole number of CPUs, at least 1 (got {files.short_repr(text)})")
    return value
