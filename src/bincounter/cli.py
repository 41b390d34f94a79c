"""`bincounter <command>`: a thin command line over the wings. Every subcommand has --help.

Flags override params.yaml; anything without a flag can be set with --set section.key=value. The
training flags (and MLproject's parameters, and SageMaker's hyperparameter names) are derived from the
declared knobs in bincounter.config, so a knob is declared once. This module also picks where training
runs (locally, as a SageMaker job, or inside one), so the training function never has to ask.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable

from bincounter.config import Knob, knobs, load_config, train_knobs
from bincounter.errors import BincounterError, user_message

HPO_KNOBS = ("n_trials", "n_jobs", "objective")


def _hpo_knobs() -> list[Knob]:
    return [k for k in knobs("hpo") if k.name in HPO_KNOBS]


def _add_params_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=None, help="params file (default: params.yaml or $BINCOUNTER_PARAMS)")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="override any parameter, e.g. --set data.per_class=50 (repeatable)",
    )


def _add_knob_flags(parser: argparse.ArgumentParser, flags: list[Knob]) -> None:
    for knob in flags:
        # --batch-size, and --batch_size as SageMaker passes hyperparameters; values are typed in config
        options = [f"--{knob.name.replace('_', '-')}"] + ([f"--{knob.name}"] if "_" in knob.name else [])
        parser.add_argument(*options, dest=knob.name, default=None, metavar="VALUE",
                            help=f"{knob.help} [{knob.key}]")


def _overrides(args: argparse.Namespace, flags: list[Knob] = ()) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise BincounterError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value
    for knob in flags:
        if getattr(args, knob.name, None) is not None:
            overrides[knob.key] = getattr(args, knob.name)
    return overrides


def _config(args: argparse.Namespace, flags: list[Knob] = ()):
    return load_config(args.params, _overrides(args, flags))


# ------------------------------------------------------------------ commands


def cmd_catalog(args):
    from bincounter.data.source import lean_memory

    lean_memory()  # before pyarrow's import
    from bincounter.data.catalog import build_catalog

    build_catalog(_config(args).data)


def cmd_fetch(args):
    from bincounter.data.source import lean_memory

    lean_memory()  # before pyarrow's import
    from bincounter.data.fetch import fetch

    fetch(_config(args).data)


def cmd_split(args):
    from bincounter.data.split import split

    split(_config(args))


def cmd_prepare(args):
    from bincounter.data.prepare import prepare

    prepare(_config(args))


def cmd_sync(args):
    from bincounter.data.sync import sync

    sync(_config(args))


def cmd_train(args):
    config = _config(args, train_knobs())
    resume = args.resume or str(args.resume_flag).lower() in ("true", "1", "yes")
    from bincounter.aws.container import in_container, train

    if in_container():
        return train(config)
    if config.train.backend == "sagemaker":
        from bincounter.aws.jobs import launch_training

        return launch_training(config)
    from bincounter.training.run import data_dirs_for, run_training

    return run_training(config, data_dirs_for(config), resume=resume)


def cmd_evaluate(args):
    from bincounter.training.evaluate import evaluate_model

    evaluate_model(_config(args), args.model, args.split)


def cmd_hpo(args):
    config = _config(args, train_knobs() + _hpo_knobs())
    # search dimensions given on the command line (e.g. -P arch=resnet18) are pinned, not searched
    pinned = {name for name in config.hpo.space if getattr(args, name, None) not in (None, "")}
    if config.train.backend == "sagemaker":
        from bincounter.aws.tuning import launch_tuning

        return launch_tuning(config, pinned)
    from bincounter.training.hpo import run_hpo

    return run_hpo(config, pinned)


def cmd_predict(args):
    from bincounter.serving.predict import predict_command

    predict_command(_config(args), args.paths, model=args.model, endpoint=args.endpoint,
                    batch_size=args.batch_size, region=args.region)


def cmd_reconcile(args):
    from bincounter.serving.reconcile import reconcile_command

    reconcile_command(_config(args), model=args.model, expected=args.expected, images=args.images,
                      report=args.report, low_confidence=args.low_confidence, batch_size=args.batch_size)


def cmd_deploy(args):
    from bincounter.serving.deploy import deploy_command

    deploy_command(_config(args), action=args.action, model=args.model, name=args.name, tag=args.tag,
                   base=args.base, wheels=args.wheels, push=args.push)


def cmd_mlproject(args):
    text = render_mlproject()
    if not args.check:
        sys.stdout.write(text)
        return None
    with open(args.check) as handle:
        if handle.read() != text:
            raise BincounterError(f"{args.check} is out of date: run `bincounter mlproject > {args.check}`")
    print(f"{args.check} matches the declared knobs")
    return None


# ------------------------------------------------------------------ MLproject, derived


MLPROJECT_HEADER = """\
# Generated by `bincounter mlproject > MLproject` from the knobs declared in src/bincounter/config.py;
# a test fails when this file and the declaration disagree. Every parameter defaults to "" = "use
# params.yaml", the one source of defaults. `mlflow run . --env-manager local` uses the current
# environment (after the README install); with conda, conda.yaml installs this package.
name: bincounter
conda_env: conda.yaml

entry_points:
"""


def _entry_point(name: str, command: str, params: list[tuple[str, str]], flags: dict[str, str]) -> str:
    """One entry point: its parameters (name, default) and a folded command passing flag -> {param}."""
    lines = [f"  {name}:", "    parameters:"]
    lines += [f'      {param}: {{type: string, default: "{default}"}}' for param, default in params]
    lines.append("    command: >-")
    line = f"      python -m bincounter {command}"
    for flag, param in flags.items():
        word = f"--{flag.replace('_', '-')} {{{param}}}"
        if len(line) + len(word) >= 110:
            lines.append(line)
            line = "     "
        line += " " + word
    return "\n".join(lines + [line]) + "\n"


def render_mlproject() -> str:
    train = [k.name for k in train_knobs()]
    hpo = [k.name for k in _hpo_knobs()] + train
    main = _entry_point("main", "train", [(n, "") for n in train] + [("resume", "false")],
                        {**{n: n for n in train}, "resume_flag": "resume"})
    evaluate = ("  evaluate:\n    parameters:\n"
                '      model_uri: {type: string, default: "models:/bin-counter@champion"}\n'
                '      split: {type: string, default: "test"}\n'
                "    command: python -m bincounter evaluate --model {model_uri} --split {split}\n")
    hpo_entry = _entry_point("hpo", "hpo", [(n, "") for n in hpo], {n: n for n in hpo})
    return MLPROJECT_HEADER + main + "\n" + evaluate + "\n" + hpo_entry


# ------------------------------------------------------------------ the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bincounter",
        description="Count the items in warehouse bin photos: data pipeline, training, tuning, serving.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_params_args(p)
        p.set_defaults(func=func)
        return p

    add("catalog", cmd_catalog, "Read the source's metadata (data.subset's bins) into data/catalog.parquet.")
    add("fetch", cmd_fetch, "Download the catalog's query (data.subset, counts, ids) into tar shards in data/raw/.")
    add("split", cmd_split, "Label and split the fetched bins 60/20/20 by count; write the EDA report.")
    add("prepare", cmd_prepare, "Resize every photo once into JPEG shards in data/prepared/<split>/.")
    add("sync", cmd_sync, "Upload the prepared splits to sync.s3_uri as SageMaker channels.")

    p = add("train", cmd_train, "Train a bin counter and log it to MLflow (train.backend: local or sagemaker).")
    _add_knob_flags(p, train_knobs())
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    p.add_argument("--resume-flag", dest="resume_flag", default=None, help=argparse.SUPPRESS)  # MLproject: true|false

    p = add("evaluate", cmd_evaluate, "Evaluate a logged model on a split and log metrics and plots to a run.")
    p.add_argument("--model", required=True, help="model URI, e.g. models:/bin-counter@champion")
    p.add_argument("--split", default="test", help="train | val | test, or a prepared split folder")

    p = add("hpo", cmd_hpo, "Hyperparameter search (Optuna locally, SageMaker's tuner remotely).")
    _add_knob_flags(p, train_knobs() + _hpo_knobs())

    p = add("predict", cmd_predict, "Count the items in images: files, folders or s3:// prefixes.")
    p.add_argument("paths", nargs="+", help="image files, folders or s3:// prefixes")
    p.add_argument("--model", default=None, help="model URI (default models:/<model_name>@champion)")
    p.add_argument("--endpoint", default=None, help="send requests to this SageMaker endpoint instead")
    p.add_argument("--region", default=None, help="AWS region of the endpoint (default deploy.region)")
    p.add_argument("--batch-size", type=int, default=32, help="images per request")

    p = add("reconcile", cmd_reconcile, "Compare predicted counts with recorded ones and flag disagreeing bins.")
    p.add_argument("--model", default=None, help="model URI (default models:/<model_name>@champion)")
    p.add_argument("--expected", required=True, help="CSV of image_id,expected, or a folder of ABID metadata JSON")
    p.add_argument("--images", required=True, help="folder (or s3:// prefix) holding <image_id>.jpg")
    p.add_argument("--report", default="reconcile.csv", help="CSV report to write")
    p.add_argument("--low-confidence", type=float, default=None,
                   help="calibrated confidence below which a disagreement is 'low_confidence', not 'flagged' "
                        "(default: the model's threshold, recorded at training to reach 90%% precision on validation)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")

    p = add("deploy", cmd_deploy, "Build the serving image; create, update, inspect or delete the SageMaker "
            "endpoint; run a batch transform (deploy: in params).")
    p.add_argument("action", choices=["build-image", "create", "update", "get", "delete", "list", "transform"],
                   help="what to do")
    p.add_argument("--model", default=None, help="model URI (default models:/<model_name>@champion)")
    p.add_argument("--name", default=None, help="endpoint (or transform job) name (default deploy.endpoint_name)")
    p.add_argument("--tag", default=None, help="build-image: the image name, e.g. bin-counter-serving:3")
    p.add_argument("--base", default=None, help="build-image: base image (default python:3.11-slim)")
    p.add_argument("--wheels", default=None, metavar="DIR",
                   help="build-image: download every wheel into DIR on this machine and build offline")
    p.add_argument("--push", action="store_true", help="build-image: push to ECR (repository created if missing)")

    p = add("mlproject", cmd_mlproject, "Print the MLproject file derived from the declared knobs.")
    p.add_argument("--check", metavar="FILE", default=None, help="fail unless FILE equals the derived MLproject")
    return parser


def main(argv: list[str] | None = None) -> int:
    from bincounter.aws.container import in_container

    if in_container():
        # a SageMaker job passes every hyperparameter as --name value; those without a flag still arrive
        # through SM_HPS (aws.container.apply), so they must not stop the job here
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:
            print(f"note: arguments without a flag (applied from SM_HPS if known): {' '.join(unknown)}")
    else:
        args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill`: the same clean stop as Ctrl-C
    try:
        args.func(args)
    except BincounterError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: partial results were not kept; rerun to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
