"""`bincounter <stage>`: a thin command line over the library. Every subcommand has --help.

Flags override params.yaml; anything without a flag can be set with --set section.key=value.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from bincounter.errors import BincounterError

# flag name -> dotted params key, per subcommand group
TRAIN_FLAGS: dict[str, tuple[str, type | None, str]] = {
    "backend": ("train.backend", None, "local | sagemaker"),
    "arch": ("train.arch", None, "torchvision backbone: resnet18, resnet34, resnet50, ..."),
    "pretrained": ("train.pretrained", None, "true: start from torchvision ImageNet weights"),
    "weights_path": ("train.weights_path", None, "local .pth state dict to start from (offline pretrained)"),
    "epochs": ("train.epochs", None, "epochs"),
    "batch_size": ("train.batch_size", None, "batch size"),
    "lr": ("train.lr", None, "learning rate"),
    "weight_decay": ("train.weight_decay", None, "weight decay"),
    "optimizer": ("train.optimizer", None, "adamw | sgd"),
    "loss": ("train.loss", None, "ce | emd (ordinal-aware)"),
    "class_balance": ("train.class_balance", None, "weighted_loss | sampler | none"),
    "augment": ("train.augment", None, "augmentation strength 0..1"),
    "image_size": ("train.image_size", None, "training crop size"),
    "seed": ("train.seed", None, "random seed"),
    "patience": ("train.patience", None, "early stopping patience (epochs)"),
    "num_workers": ("train.num_workers", None, "data loader workers (-1 = auto)"),
    "device": ("train.device", None, "auto | cpu | cuda"),
    "precision": ("train.precision", None, "auto | bf16 | fp32 (auto: bf16 on GPUs and CPUs with native bf16)"),
    "data_dir": ("train.data_dir", None, "prepared data folder (train/ val/ test/)"),
    "checkpoint_dir": ("train.checkpoint_dir", None, "checkpoint folder (--resume reads it)"),
    "profile_steps": ("train.profile_steps", None, "torch.profiler steps to record (0 = off)"),
    "model_name": ("mlflow.model_name", None, "registered model name"),
    "experiment": ("mlflow.experiment", None, "MLflow experiment"),
}


def _add_params_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=None, help="params file (default: params.yaml or $BINCOUNTER_PARAMS)")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="override any parameter, e.g. --set data.per_class=50 (repeatable)",
    )


def _add_flags(parser: argparse.ArgumentParser, flags: dict[str, tuple[str, Any, str]]) -> None:
    for name, (_, kind, help_text) in flags.items():
        # --batch-size, and --batch_size as SageMaker passes hyperparameters
        options = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        parser.add_argument(*options, dest=name, type=kind, default=None, help=help_text)


def _overrides(args: argparse.Namespace, flags: dict[str, tuple[str, Any, str]] | None = None) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise BincounterError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value
    for name, (key, _, _) in (flags or {}).items():
        if getattr(args, name, None) is not None:
            overrides[key] = getattr(args, name)
    return overrides


def _config(args: argparse.Namespace, flags=None):
    from bincounter.config import load_config

    return load_config(args.params, _overrides(args, flags))


# ------------------------------------------------------------------ commands


def cmd_fetch(args):
    from bincounter.fetch import fetch

    fetch(_config(args).data)


def cmd_split(args):
    from bincounter.split import split

    split(_config(args))


def cmd_prepare(args):
    from bincounter.prepare import prepare

    prepare(_config(args))


def cmd_sync(args):
    from bincounter.sync import sync

    sync(_config(args))


def cmd_train(args):
    from bincounter.train import run_training

    resume = args.resume or str(args.resume_flag).lower() in ("true", "1", "yes")
    run_training(_config(args, TRAIN_FLAGS), resume=resume)


def cmd_evaluate(args):
    from bincounter.evaluate import evaluate_model

    evaluate_model(_config(args), args.model, args.split)


def cmd_hpo(args):
    from bincounter.hpo import run_hpo

    from bincounter.config import load_config

    overrides = {"hpo.n_trials": args.n_trials, "hpo.n_jobs": args.n_jobs, "hpo.objective": args.objective}
    config = load_config(args.params, {**_overrides(args, TRAIN_FLAGS), **overrides})
    # search dimensions given on the command line (e.g. -P arch=resnet18) are pinned, not searched
    pinned = {name for name in config.hpo.space if getattr(args, name, None) not in (None, "")}
    run_hpo(config, pinned)


def cmd_predict(args):
    from bincounter.predict import predict_command

    predict_command(_config(args), args.paths, model=args.model, endpoint=args.endpoint,
                    batch_size=args.batch_size, region=args.region)


def cmd_reconcile(args):
    from bincounter.predict import reconcile_command

    reconcile_command(_config(args), model=args.model, expected=args.expected, images=args.images,
                      report=args.report, low_confidence=args.low_confidence, batch_size=args.batch_size)


def cmd_deploy(args):
    from bincounter.deploy import deploy_command

    deploy_command(_config(args), action=args.action, model=args.model, name=args.name)


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

    add("fetch", cmd_fetch, "Download the ABID subset (data.subset) from data.source into data/raw/.")
    add("split", cmd_split, "Label and split data/raw 60/20/20 by count; write the EDA report.")
    add("prepare", cmd_prepare, "Decode and resize every image once into data/prepared/<split>/images.npy.")
    add("sync", cmd_sync, "Upload the prepared splits to sync.s3_uri as SageMaker channels.")

    p = add("train", cmd_train, "Train a bin counter and log it to MLflow (local or SageMaker backend).")
    _add_flags(p, TRAIN_FLAGS)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    p.add_argument("--resume-flag", dest="resume_flag", default=None, help=argparse.SUPPRESS)  # MLproject: true|false

    p = add("evaluate", cmd_evaluate, "Evaluate a logged model on a split and log metrics and plots to a run.")
    p.add_argument("--model", required=True, help="model URI, e.g. models:/bin-counter@champion")
    p.add_argument("--split", default="test", help="train | val | test, or a prepared split folder")

    p = add("hpo", cmd_hpo, "Hyperparameter search (Optuna locally, SageMaker's tuner remotely).")
    _add_flags(p, TRAIN_FLAGS)
    p.add_argument("--n-trials", default=None, help="number of trials")
    p.add_argument("--n-jobs", default=None, help="parallel trials (local)")
    p.add_argument("--objective", default=None, help="macro_accuracy | rmse")

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
    p.add_argument("--low-confidence", type=float, default=0.5, help="confidence below which a bin is 'low'")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")

    p = add("deploy", cmd_deploy, "Create, update, inspect or delete the SageMaker endpoint (deploy: in params).")
    p.add_argument("action", choices=["create", "update", "get", "delete", "list"], help="what to do")
    p.add_argument("--model", default=None, help="model URI (default models:/<model_name>@champion)")
    p.add_argument("--name", default=None, help="endpoint name (default deploy.endpoint_name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from bincounter import sagemaker_env

    if sagemaker_env.in_container():
        # a SageMaker job passes every hyperparameter as --name value; those without a flag still arrive
        # through SM_HPS (sagemaker_env.apply), so they must not stop the job here
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:
            print(f"note: arguments without a flag (applied from SM_HPS if known): {' '.join(unknown)}")
    else:
        args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BincounterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: partial results were not kept; rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
