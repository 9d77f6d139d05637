#!/usr/bin/env python3
"""DF-DAM pipeline command line.

One subcommand per stage of the pipeline; each builds its arguments (or one typed
config) and calls one function. Run ``python run.py <command> --help`` for details.
"""
from __future__ import annotations

import argparse
import os
import sys


def _add_profile(sub: argparse._SubParsersAction) -> None:
    from models.names import BACKBONES, VARIANTS

    p = sub.add_parser(
        "profile",
        help="count parameters and multiply-accumulates of DF-DAM and reference models",
        description=(
            "Count DF-DAM's parameters and multiply-accumulates (MACs) at a given input "
            "size, with torch.utils.flop_counter on the meta device (no weights, no "
            "compute). The auxiliary heads are excluded, as in the paper's Tables 4 and "
            "6. Prints DF-DAM beside torchvision's fcn_resnet101 and deeplabv3_resnet101 "
            "at the same input, and the paper's own figures."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", default="resnet18", choices=BACKBONES)
    p.add_argument("--variant", default="dafm+2dpam", choices=VARIANTS,
                   help="ablation variant of the paper's Tables 1-2")
    p.add_argument("--size", default="320x640", help="input size as HxW (the paper: 320x640)")
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.add_argument("--no-reference", action="store_true",
                   help="skip the torchvision reference models (faster)")
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args: argparse.Namespace) -> int:
    from pipeline.profiling import format_rows, profile_rows
    from sharding.text import parse_size

    try:
        size = parse_size(args.size, minimum=32)  # the trunk's output stride
    except ValueError as exc:
        print(f"run.py profile: error: --size: {exc}", file=sys.stderr)
        return 2
    rows = profile_rows(args.backbone, size, args.num_classes, variant=args.variant,
                        references=not args.no_reference)
    print(format_rows(rows, args.format))
    return 0


def _add_config_args(p: argparse.ArgumentParser, default_preset: str = "synthetic") -> None:
    from pipeline.config import PRESETS

    p.add_argument("--preset", default=default_preset, choices=list(PRESETS),
                   help="hyper-parameters: the paper's for cityscapes (batch 8, lr 0.01, wd 5e-4, crop 1024) "
                        "and voc (batch 16, lr 0.001, wd 1e-5, crop 512); small and fast for synthetic")
    p.add_argument("--data", required=True, metavar="SHARD_DIR",
                   help="folder written by `run.py shard` (<split>-NNNNNN.tar + <split>.manifest.parquet), or a "
                        "copy of it at an https://, s3:// or gs:// URL that every node reads (README: Shards on "
                        "remote storage)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set optim.lr=0.02 --set data.crop_size=256x256; "
                        "sections: model, data, optim, loss, train, tracking, inference (repeatable)")
    p.add_argument("--workers", type=int, help="Ray Train workers (train.workers)")
    p.add_argument("--epochs", type=int, help="epochs (train.epochs)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, mixed precision")
    p.add_argument("--cpus-per-worker", type=int, metavar="N",
                   help="CPUs Ray reserves for each worker (train.cpus_per_worker, default 1): its training loop "
                        "takes one, the others run data-loading processes (data.loader_workers, -1 by default "
                        "= N - 1, at least 1); give a GPU worker the cores its node has per GPU, e.g. 8")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--storage", help="Ray Train storage folder for checkpoints (train.storage, default ./runs); "
                                     "on a multi-node cluster a path every node reaches (NFS), or s3://BUCKET/PATH "
                                     "or gs://BUCKET/PATH (an S3-compatible store: AWS_ENDPOINT_URL, or "
                                     "?endpoint_override=HOST:PORT&scheme=http)")
    p.add_argument("--max-failures", type=int, metavar="N",
                   help="restarts from the latest checkpoint after a lost worker or node (train.max_failures; "
                        "presets: cityscapes and voc 3, synthetic 0; -1 = no limit)")


def _config_from_args(args: argparse.Namespace):
    from pipeline.config import build_config

    overrides = [f"data.shards={args.data}", *args.overrides]
    if args.workers is not None:
        overrides.append(f"train.workers={args.workers}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.gpu:
        overrides.append("train.gpu=true")
    if args.cpus_per_worker is not None:
        overrides.append(f"train.cpus_per_worker={args.cpus_per_worker}")
    if args.storage:
        overrides.append(f"train.storage={args.storage}")
    if args.max_failures is not None:
        overrides.append(f"train.max_failures={args.max_failures}")
    return build_config(args.preset, overrides)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train DF-DAM data-parallel with Ray Train, tracked in MLflow",
        description=(
            "Train DF-DAM with Ray Train (DDP: gloo on CPU, NCCL on GPU) from WebDataset shards. "
            "Every epoch: a checkpoint through Ray Train, validation mIoU (confusion matrix "
            "all-reduced across workers) and per-class IoU logged to MLflow from rank 0. At the "
            "end: the confusion matrix, colourised prediction overlays and the model are logged. "
            "MLflow: MLFLOW_TRACKING_URI, else an SQLite store ./mlflow.db."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_config_args(p)
    p.add_argument("--name", help="run name (default: <preset>-<timestamp>); checkpoints in <storage>/<name>")
    p.add_argument("--resume", action="store_true",
                   help="continue the run --name from its latest checkpoint (after a crash or to train longer)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train import fit, print_result

    if args.resume and not args.name:
        print("run.py train: error: --resume needs --name NAME of the run to continue", file=sys.stderr)
        return 2
    cfg = _config_from_args(args)
    result = fit(cfg, name=args.name, resume=args.resume, address=args.address)
    print_result(result)
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="mIoU and per-class IoU of a trained model on a shard split (the paper's protocol: --ms --flip)",
        description=(
            "Evaluate a trained model on a split of WebDataset shards and print the mIoU, pixel "
            "accuracy and a per-class IoU table. --model takes a checkpoint file, a checkpoint folder, "
            "a Ray Train run folder (its newest checkpoint), an MLflow run id, or an MLflow model URI "
            "such as models:/dfdam-synthetic@champion. Predictions: whole images at one scale by "
            "default; --scales and --flip average the softmax over scales and left-right flips at the "
            "input size (the paper's test protocol, sections 4.4-4.5: --ms --flip); --mode slide runs "
            "--crop windows --stride apart. --workers N spreads the shards over N Ray workers (--gpu: "
            "one GPU each), each shard read once. When the model came from MLflow (or with --run), the "
            "result is logged to that run as <split>_miou_<protocol> (val_miou_ms_flip, "
            "val_miou_single, ...) with eval/<split>_<protocol>.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint, run folder, MLflow run id or models:/ URI")
    p.add_argument("--data", required=True, metavar="SHARD_DIR",
                   help="folder written by `run.py shard`, or its https://, s3:// or gs:// URL")
    p.add_argument("--split", default="val", help="split to evaluate")
    _add_inference_args(p)
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="Ray workers to spread the shards over (0: predict in this process)")
    p.add_argument("--gpu", action="store_true", help="predict on GPUs (one per Ray worker, or this process's)")
    p.add_argument("--address", help="Ray cluster to join with --workers (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--run", metavar="RUN_ID", help="MLflow run to log the result to (default: the run that logged "
                                                   "an MLflow model; none for a checkpoint)")
    p.add_argument("--no-log", action="store_true", help="log nothing to MLflow")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.set_defaults(func=_cmd_evaluate)


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    """How predictions are made (config section ``inference``), shared by evaluate and predict."""
    p.add_argument("--scales", metavar="S,S,...", default="1.0",
                   help="input scales whose softmax is averaged, e.g. 0.5,0.75,1.0,1.25,1.5,1.75,2.0")
    p.add_argument("--ms", action="store_true", help="the paper's scales 0.5,0.75,1.0,1.25,1.5,1.75,2.0 (section 4.4)")
    p.add_argument("--flip", action="store_true", help="also average over left-right flips")
    p.add_argument("--mode", default="whole", choices=["whole", "slide"], help="whole images or sliding windows")
    p.add_argument("--crop", metavar="HxW", help="sliding window size (--mode slide)")
    p.add_argument("--stride", metavar="HxW", help="step between windows (default: 2/3 of --crop)")


def _inference_from_args(args: argparse.Namespace):
    from pipeline.config import PAPER_EVAL_SCALES, InferenceConfig, apply_overrides, preset

    overrides = [f"inference.scales={','.join(map(str, PAPER_EVAL_SCALES)) if args.ms else args.scales}",
                 f"inference.flip={args.flip}", f"inference.mode={args.mode}"]
    overrides += [f"inference.{name}={getattr(args, name)}" for name in ("crop", "stride") if getattr(args, name)]
    settings: InferenceConfig = apply_overrides(preset("synthetic"), overrides).inference
    return settings


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from pipeline.evaluate import evaluate_model

    report = evaluate_model(args.model, args.data, args.split, tracking_uri=args.tracking_uri,
                            settings=_inference_from_args(args), workers=args.workers, gpu=args.gpu,
                            address=args.address, log_run=args.run, log=not args.no_log,
                            show_progress=args.format == "table")
    if args.format == "json":
        print(json.dumps({"model": report.model, "split": report.split, "samples": report.samples,
                          "protocol": report.settings.protocol or "single", "miou": report.miou,
                          "pixel_acc": report.pixel_acc, "images_per_s": report.images_per_s,
                          "workers": report.workers, "per_class": report.per_class, "logged_to": report.logged_to},
                         indent=2))
    else:
        s = report.settings
        how = (f"{s.mode}, scales {','.join(f'{x:g}' for x in s.scales)}{', flip' if s.flip else ''}"
               + (f", crop {s.crop[0]}x{s.crop[1]}" if s.crop else ""))
        where = f"{report.workers} Ray worker(s)" if report.workers else "this process"
        print(f"model: {report.model}\nsplit: {report.split} ({report.samples} images)\n"
              f"predictions: {how}; {report.images_per_s:.2f} images/s on {where}\n")
        print(report.table)
        if report.logged_to:
            print(f"\nlogged to MLflow run {report.logged_to}: {', '.join(report.metrics())}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    from pipeline.predict import FILES_PER_TASK, FORMATS, VOC_COMPETITIONS

    p = sub.add_parser(
        "predict",
        help="segmentation files for an image, a folder of images or a shard split (Cityscapes / VOC server formats)",
        description=(
            "Predict with a trained model (what `run.py evaluate` takes: a checkpoint file or folder, a Ray "
            "Train run folder, an MLflow run id or a models:/ URI) and write, for every image <name>, into "
            "--out: <name>_trainid.png (train ids, 8-bit grey, the image's size), <name>_color.png (in the "
            "dataset's palette; the VOC colour map if the model records none) and <name>_overlay.png (the "
            "colours over the image). --input is one image, a folder of images (PNG/JPG, subfolders kept: "
            "<name> is the path below --input with the stem, a trailing _leftImg8bit removed) or a shard "
            "folder (the --split's samples; <name> is the sample key; unlabelled test splits too). "
            "--format cityscapes adds cityscapes_results/<name>_leftImg8bit.png with Cityscapes label ids "
            "(not train ids), what csEvalPixelLevelSemanticLabeling (CITYSCAPES_RESULTS=<out>/cityscapes_results) "
            "and the test server read. --format voc adds results/VOC2012/Segmentation/<comp>_<split>_cls/<id>.png, "
            "palette PNGs of class ids, the VOC devkit's layout for the evaluation server. Predictions as "
            "evaluate makes them (--ms --flip: the paper's test protocol; --mode slide). Images are read one "
            "at a time and batched by size (never padded); --workers N runs groups of "
            f"{FILES_PER_TASK} files (or one shard) as Ray tasks that write straight into --out, which on a "
            "multi-node cluster must be a folder every node reaches (NFS). Files are written atomically; a "
            "re-run overwrites them."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint, run folder, MLflow run id or models:/ URI")
    p.add_argument("--input", required=True, metavar="IMAGE|DIR|SHARD_DIR",
                   help="an image file, a folder of images, or a folder written by `run.py shard` (also as an "
                        "https://, s3:// or gs:// URL)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the files (created if needed)")
    p.add_argument("--format", default="plain", choices=FORMATS,
                   help="plain: the three PNGs per image; cityscapes / voc: also the benchmark server's files")
    p.add_argument("--split", default="val",
                   help="the split to read from a SHARD_DIR; with --format voc also the results folder's name "
                        "(<comp>_<split>_cls: test for the server)")
    p.add_argument("--voc-competition", default="comp6", choices=VOC_COMPETITIONS,
                   help="VOC results folder: comp5 for a model trained on VOC 2012 trainval alone, comp6 for "
                        "any other training data (SBD's train_aug, ImageNet weights)")
    _add_inference_args(p)
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="consecutive images of one size predicted together")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="Ray workers to spread the images over (0: predict in this process)")
    p.add_argument("--gpu", action="store_true", help="predict on GPUs (one per Ray worker, or this process's)")
    p.add_argument("--address", help="Ray cluster to join with --workers (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.predict import PredictError, predict

    try:
        report = predict(args.model, args.input, args.out, split=args.split, format=args.format,
                         settings=_inference_from_args(args), batch_size=args.batch_size, workers=args.workers,
                         gpu=args.gpu, address=args.address, tracking_uri=args.tracking_uri,
                         voc_competition=args.voc_competition, show_progress=not args.no_progress)
    except PredictError as exc:
        print(f"run.py predict: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="pictures of DAFM's channel weights and 2DPAM's confidence map on one image (Figures 7-8)",
        description=(
            "Run a trained model on one image and draw what its attention modules do (section 4.3, "
            "Figures 7 and 8). Writes into --out: alpha.png (DAFM's channel weights alpha_H and "
            "alpha_L by channel and sorted, the highest and lowest named), channels_low.png and "
            "channels_high.png (the --channels highest- and lowest-weighted channel maps of the "
            "low-level features X^L and high-level features X^H), beta.png (2DPAM's confidence map "
            "over the image), prediction.png (the predicted classes in the dataset's palette) and "
            "attention.npz (the tensors behind the pictures). A model without DAFM or 2DPAM "
            "(model.variant sum or dafm) gets what it has, and the rest is named as missing. A "
            "checkpoint gives the normalisation and palette it was trained with; an MLflow model "
            "gets the ImageNet mean/std and the VOC colour map. The image is used at its own size "
            "(any size: the network resizes internally) unless --size is given."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint, run folder, MLflow run id or models:/ URI")
    p.add_argument("--input", required=True, metavar="IMAGE", help="an RGB image file (PNG, JPG)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures (created if needed)")
    p.add_argument("--size", metavar="HxW",
                   help="resize the image to HxW (bilinear) first; without it the image keeps its own size")
    p.add_argument("--channels", type=int, default=4, metavar="K",
                   help="how many highest- and how many lowest-weighted channels to draw")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    from pipeline.explain import ExplainError, explain_reference
    from sharding.text import parse_size

    try:
        size = parse_size(args.size) if args.size else None
    except ValueError as exc:
        print(f"run.py explain: error: --size: {exc}", file=sys.stderr)
        return 2
    try:
        report = explain_reference(args.model, args.input, args.out, size=size, channels=args.channels,
                                   tracking_uri=args.tracking_uri)
    except ExplainError as exc:
        print(f"run.py explain: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary)
    for missing in report.missing:
        print(f"not written: {missing}")
    for path in report.removed:
        print(f"removed {path} (left by an earlier explain; this model has no such output)")
    print("wrote: " + ", ".join(str(p) for p in report.written))
    return 0


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="Ray Tune search over lambda_c, lambda_s and the learning rate; best model to the registry",
        description=(
            "Search Eq. 12's auxiliary-loss weights lambda_c, lambda_s and the learning rate with Ray "
            "Tune. Each trial is one distributed Ray Train run reporting validation mIoU every epoch; "
            "ASHA stops weak trials early; Optuna's TPE proposes the next point, starting from the "
            "paper's values (0.4, 0.1, the preset's lr). Default space: lambda_c ~ uniform[0, 1], "
            "lambda_s ~ uniform[0, 0.5], lr ~ loguniform[lr/10, 10 lr]. MLflow: one parent run per "
            "search, one child run per trial; the best finished trial's model is registered as "
            "dfdam-<dataset> and gets the alias 'champion' if it beats the current champion on the "
            "same validation data. The paper's ablation (section 4.2, Tables 1-2): --grid "
            "model.variant=sum,dafm,dafm+2dpam trains every variant (and every value of each other --grid "
            "field) at the preset's lambdas and lr, to the end (Tune's basic variant generator, no early "
            "stopping), prints them as the paper's tables with the paper's mIoU beside, and registers "
            "nothing unless --register-as names a model."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_config_args(p)
    # No argparse defaults for these three: they depend on --grid (pipeline.search_space.resolve_settings).
    p.add_argument("--trials", type=int, default=argparse.SUPPRESS,
                   help="number of trials (default 8); with --grid, samples per grid point (default 1; more "
                        "only with a sampled --space dimension: for repeats, add --grid train.seed=0,1,2)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default=argparse.SUPPRESS,
                   help="early stopping (asha, the default) or none (fifo, the only one with --grid)")
    p.add_argument("--search", choices=["optuna", "random"], default=argparse.SUPPRESS,
                   help="search algorithm (default optuna; with --grid random, Tune's basic variant generator)")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                   help="run every value of a config field, e.g. model.variant=sum,dafm,dafm+2dpam or "
                        "model.backbone=resnet18,resnet50 (values parsed by the field's type; separate them with "
                        "';' when they hold commas); with a grid, lambda_c, lambda_s and lr stay at the preset's "
                        "values unless --space names them (repeatable: the grids' product is run)")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials running at once")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers of each trial")
    p.add_argument("--space", action="append", default=[], metavar="NAME=KIND:LOW:HIGH",
                   help="change one dimension: lambda_c=uniform:0:1, lr=loguniform:1e-3:1e-1, "
                        "lambda_s=choice:0,0.1; NAME is lambda_c, lambda_s, lr or a float config field "
                        "such as optim.weight_decay (repeatable)")
    p.add_argument("--space-file", help='JSON file: {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1}, ...}')
    p.add_argument("--name", help="search name (default: tune-<preset>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the search --name where it stopped")
    p.add_argument("--register-as",
                   help="registered model name (default: dfdam-<dataset>; with --grid: none, nothing registered)")
    p.add_argument("--seed", type=int, default=0, help="search algorithm seed")
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args: argparse.Namespace) -> int:
    import time

    from pipeline.search_space import parse_grid, parse_space, resolve_settings
    from pipeline.trials import print_result
    from pipeline.tune import SearchInterrupted, SearchSettings, search

    if args.resume and not args.name:
        print("run.py tune: error: --resume needs --name NAME of the search to continue", file=sys.stderr)
        return 2
    cfg = _config_from_args(args)
    space = parse_space(cfg, args.space, args.space_file, grid=parse_grid(cfg, args.grid))
    trials, scheduler, search_alg = resolve_settings(space, getattr(args, "trials", None),
                                                     getattr(args, "scheduler", None), getattr(args, "search", None))
    settings = SearchSettings(
        name=args.name or f"tune-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}",
        trials=trials, scheduler=scheduler, search=search_alg,
        max_concurrent=args.max_concurrent, workers_per_trial=args.workers_per_trial, seed=args.seed,
    )
    try:
        result = search(cfg, settings, space, resume=args.resume, address=args.address, register_as=args.register_as)
    except SearchInterrupted as exc:
        print(f"run.py tune: {exc}", file=sys.stderr)
        return 130
    print_result(result)
    return 0


def _add_make_synthetic(sub: argparse._SubParsersAction) -> None:
    from sharding.classes import DATASETS

    p = sub.add_parser(
        "make-synthetic",
        help="write a small, learnable scene dataset in the real Cityscapes or VOC + SBD layout",
        description=(
            "Write a small synthetic scene-segmentation dataset, deterministically from --seed, in "
            "the exact on-disk layout of the real one, so that `run.py shard` reads it with the real "
            "readers. cityscapes: leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png "
            "and gtFine/.../*_gtFine_labelIds.png (official label ids, including void ids such as ego "
            "vehicle) plus *_gtFine_color.png. voc: VOCdevkit/VOC2012/{JPEGImages,SegmentationClass "
            "(palette PNGs with the 255 border),ImageSets/Segmentation} and benchmark_RELEASE/dataset/"
            "{img,cls/*.mat (GTcls.Segmentation),train.txt,val.txt}, with split lists that overlap like "
            "the real ones. Street scenes (sky, buildings, trees, road, sidewalks, cars, people, poles) "
            "or object photos, each class with its own colour family, shape and texture, under varying "
            "light and noise: learnable by a small network on a CPU in minutes. The folder also gets "
            "dfdam_synthetic.json, declaring the image count of every split for the sharder's count check."
        ),
    )
    p.add_argument("--layout", required=True, choices=DATASETS, help="which dataset layout to write")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="dataset root to create (must be empty, new, or an earlier synthetic dataset)")
    p.add_argument("--seed", type=int, default=0, help="every image and list follows from it (default: 0)")
    p.add_argument("--train", type=int, metavar="N",
                   help="training images: Cityscapes train (default 48) or VOC train_aug (default 64)")
    p.add_argument("--val", type=int, metavar="N", help="validation images (default 12 Cityscapes, 16 VOC)")
    p.add_argument("--test", type=int, default=6, metavar="N", help="test images, unlabelled (default: 6)")
    p.add_argument("--size", default="128x256", metavar="HxW", help="Cityscapes image size (default: 128x256; the real one is 1024x2048)")
    p.add_argument("--min-size", type=int, default=96, metavar="PX", help="VOC: smallest image height or width (default: 96)")
    p.add_argument("--max-size", type=int, default=160, metavar="PX", help="VOC: largest image height or width (default: 160)")
    p.set_defaults(func=_cmd_make_synthetic)


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from sharding.synthetic import make_cityscapes, make_voc
    from sharding.text import parse_size

    def given(value: int | None, default: int) -> int:
        return default if value is None else value

    try:
        if args.layout == "cityscapes":
            height, width = parse_size(args.size)
            marker = make_cityscapes(args.out, seed=args.seed, train=given(args.train, 48),
                                     val=given(args.val, 12), test=args.test, height=height, width=width,
                                     show_progress=True)
        else:
            marker = make_voc(args.out, seed=args.seed, train_aug=given(args.train, 64), val=given(args.val, 16),
                              test=args.test, min_size=args.min_size, max_size=args.max_size, show_progress=True)
    except ValueError as exc:
        print(f"run.py make-synthetic: error: {exc}", file=sys.stderr)
        return 2
    dataset = args.layout
    counts = ", ".join(f"{split} {n}" for split, n in marker["expected_counts"].items())
    print(f"wrote a synthetic {dataset} dataset to {args.out} ({counts} images)")
    print(f"next: python run.py shard --dataset {dataset} --root {args.out} --out SHARD_DIR")
    return 0


def _add_shard(sub: argparse._SubParsersAction) -> None:
    from sharding.classes import DATASETS
    from sharding.pixels import DEFAULT_ENCODING, ENCODINGS

    p = sub.add_parser(
        "shard",
        help="pack Cityscapes or VOC 2012 + SBD into WebDataset shards with a Parquet manifest; or verify them",
        description=(
            "pack (default): read a dataset as downloaded (or as make-synthetic writes it), map its "
            "labels to train ids (Cityscapes: the official cityscapesscripts table, other ids -> 255; "
            "VOC: palette indices, 255 border; SBD: GTcls.Segmentation), check every sample, and write "
            "<out>/<split>-NNNNNN.tar WebDataset shards (image bytes as on disk, label.png of train ids, "
            "json) plus <out>/<split>.manifest.parquet and <out>/<split>.rejects.jsonl. Splits: "
            "cityscapes train, val, test (unlabelled); voc train_aug ((VOC train + SBD train + SBD val) - "
            "VOC val, 10,582), val, train (VOC train alone), trainval (train_aug + val, 12,031, "
            "for the final fine-tune), voc_trainval (VOC train + val with VOC's own masks, 2,913: the set "
            "the paper names for it) and test (VOC2012test.tar's photos, "
            "unlabelled). VOC's SBD masks are read from benchmark_RELEASE/ when present, else from "
            "VOCdevkit/VOC2012/SegmentationClassAug/ with ImageSets/Segmentation/trainaug.txt "
            "(mmsegmentation's conversion). Image counts are checked against the official ones "
            "(or those a synthetic dataset declares). Writes are atomic and a re-run skips every shard "
            "whose checksum verifies, so an interrupted (even killed) run resumes; the same input gives "
            "byte-identical shards. One run per --out at a time: another is refused while one holds "
            "<out>/.shard.lock (removed when it ends; a killed run's lock is released by the system). "
            "verify: re-read every shard in --out against its manifest and report mismatches "
            "(exit status 1 if any)."
        ),
    )
    p.add_argument("action", nargs="?", default="pack", choices=["pack", "verify"],
                   help="pack a dataset into shards (default), or verify shards against their manifests")
    p.add_argument("--dataset", choices=DATASETS, help="dataset layout under --root (pack)")
    p.add_argument("--root", metavar="DIR",
                   help="pack: dataset root holding leftImg8bit/ + gtFine/ (cityscapes) or VOCdevkit/ + "
                        "benchmark_RELEASE/ (voc; or VOCdevkit/ holding VOC2012/SegmentationClassAug/)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="shard folder to write (pack) or check (verify: also an https://, s3:// or gs:// URL of one)")
    p.add_argument("--split", nargs="+", metavar="SPLIT",
                   help="splits to pack or verify (default: cityscapes train val test; voc train_aug val, "
                        "also: voc train trainval voc_trainval test; verify: every split with a manifest)")
    p.add_argument("--shard-size", type=int, default=100, metavar="N", help="samples per shard (default: 100)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="processes packing shards in parallel (default: the number of CPU cores)")
    p.add_argument("--partial", action="store_true",
                   help="warn and go on when a split's image count differs from the expected one")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad sample instead of listing it in <split>.rejects.jsonl")
    p.add_argument("--image-encoding", choices=ENCODINGS, default=DEFAULT_ENCODING,
                   help="how images and labels are stored (default: original): original = the image file's "
                        "bytes and label.png; lz4 = decoded pixels, the image's RGB (as PIL decodes the file) "
                        "and the train ids, each a .npy in an LZ4 frame (members npy.lz4, label.npy.lz4): "
                        "lossless, decodes far faster than PNG or JPEG, larger shards (the summary prints "
                        "their size against the source files'). Re-packing a split with the other encoding "
                        "rewrites all of its shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_shard)


def _cmd_shard(args: argparse.Namespace) -> int:
    import logging

    from sharding.manifest import ManifestError, rejects_path
    from sharding.samples import DatasetError, SampleError
    from sharding.write import OutputLockedError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.action == "verify":
            from sharding import storage
            from sharding.manifest import list_splits, missing_shard_folder
            from sharding.verify import format_checks, verify_shards

            if not storage.is_folder(args.out):
                raise missing_shard_folder(args.out)
            if not args.split and not storage.is_remote(args.out) and not list_splits(args.out):
                print(f"run.py shard: error: {args.out} holds no <split>.manifest.parquet: expected the --out folder "
                      "of `run.py shard`", file=sys.stderr)
                return 2
            checks = verify_shards(args.out, args.split, show_progress=not args.no_progress)
            print(format_checks(checks))
            return 0 if all(c.ok for c in checks) else 1
        if not args.dataset or not args.root:
            print("run.py shard: error: pack needs --dataset and --root", file=sys.stderr)
            return 2
        if args.shard_size < 1 or args.workers < 1:
            print("run.py shard: error: --shard-size and --workers must be at least 1", file=sys.stderr)
            return 2
        from sharding.write import format_summary, shard_dataset

        reports = shard_dataset(args.dataset, args.root, args.out, args.split, shard_size=args.shard_size,
                                workers=args.workers, partial=args.partial, strict=args.strict,
                                show_progress=not args.no_progress, encoding=args.image_encoding)
    except (DatasetError, SampleError, ManifestError, OutputLockedError) as exc:
        hint = " (--strict stops at the first bad sample)" if isinstance(exc, SampleError) else ""
        print(f"run.py shard: error: {exc}{hint}", file=sys.stderr)
        return 2
    print(format_summary(reports))
    for report in reports:
        if report.rejects:
            print(f"{report.split}: {len(report.rejects)} rejected, listed in {rejects_path(args.out, report.split)}")
            for reject in report.rejects[:5]:
                print(f"  {reject.message()}")
    print(f"manifests: {', '.join(str(r.manifest) for r in reports)}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    from pipeline.export import DEFAULT_ATOL, DEFAULT_SAMPLE_SIZE, FORMATS

    p = sub.add_parser(
        "export",
        help="write a trained model as ONNX or TorchScript, checked against PyTorch",
        description=(
            "Export a trained model (normalised image batch B x 3 x H x W -> logits B x K x H x W, "
            "batch, height and width dynamic) as ONNX (torch.onnx's torch.export-based exporter) or "
            "TorchScript (torch.jit.trace). The file is then run, ONNX in onnxruntime on the CPU, on "
            "two inputs: batch 1 at --sample-size and batch 2 at half that size plus one pixel; the "
            "largest absolute difference from the PyTorch model's logits is printed for each. The "
            "file is kept only when both are within --atol: otherwise the command exits with 1 and "
            "writes nothing (an older file at --out stays as it was). --model takes what "
            "`run.py evaluate` takes: a checkpoint file or folder, a Ray Train run folder (its newest "
            "checkpoint), an MLflow run id or an MLflow model URI such as models:/dfdam-synthetic@champion."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint, run folder, MLflow run id or models:/ URI")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx: one .onnx file (weights inside); torchscript: a torch.jit archive (.pt)")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write (its folder must exist)")
    p.add_argument("--sample-size", default=DEFAULT_SAMPLE_SIZE, metavar="HxW",
                   help="size of the first checked input, also the example the exporter traces (at least 64x64); "
                        "the exported graph stays dynamic")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                   help="largest absolute logit difference accepted: float32 rounding gives ~1e-5, "
                        "a wrong graph 0.1 and more")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import ExportCheckError, export_reference, format_checks
    from sharding.text import parse_size

    try:
        height, width = parse_size(args.sample_size, minimum=64)
    except ValueError as exc:
        print(f"run.py export: error: --sample-size: {exc}", file=sys.stderr)
        return 2
    if not args.atol >= 0:
        print(f"run.py export: error: --atol must be >= 0, got {args.atol}", file=sys.stderr)
        return 2
    print(f"exporting {args.model} as {args.format}, checked at {height}x{width} ...", flush=True)
    try:
        report, source = export_reference(args.model, args.format, args.out, height, width,
                                          atol=args.atol, tracking_uri=args.tracking_uri)
    except ExportCheckError as exc:
        if exc.checks:
            print(format_checks(exc.checks))
        print(f"run.py export: error: {exc}", file=sys.stderr)
        return 1
    print(f"model: {source}\n{report.detail}\n")
    print(report.table)
    size_mb = report.path.stat().st_size / 2**20
    print(f"\nwrote {report.path} ({size_mb:.1f} MiB) in {report.seconds:.1f} s")
    return 0


def _add_track(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "track",
        help="MLflow tracking of a run: `track sync RUN_FOLDER` completes a run tracked while the server was away",
        description=(
            "sync: complete the MLflow run of a training run whose tracking server was away. While the "
            "server does not answer, training goes on and keeps what it could not send in the run "
            "folder's mlflow_outbox.jsonl (epoch metrics, the confusion matrix and per-class table, the "
            "run's final status); the checkpoints hold the weights. sync sends what is missing (each "
            "epoch's metrics once, by step), logs the model from the newest checkpoint and draws the "
            "confusion-matrix figure when the run has none, and closes the run with the status it ended "
            "with (FINISHED). Overlay images are not kept: `run.py predict` draws them again. Running it "
            "twice changes nothing. The run's own tracking URI is used unless --tracking-uri is given "
            "(the same server at a new address)."
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sync = actions.add_parser("sync", help="send what a run folder kept while the tracking server was away",
                              description=p.description)
    sync.add_argument("run_folder", metavar="RUN_FOLDER",
                      help="the training run's folder: train.storage/NAME (e.g. runs/my-run)")
    sync.add_argument("--tracking-uri", default=None,
                      help="send to this MLflow server instead of the URI the run was tracked at")
    sync.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="wait this long for the server to answer before giving up")
    sync.set_defaults(func=_cmd_track)


def _cmd_track(args: argparse.Namespace) -> int:
    from pipeline.track_sync import sync_run

    report = sync_run(args.run_folder, args.tracking_uri, wait_s=args.wait)
    if not report.outbox:
        print(f"{args.run_folder}: nothing to send (no mlflow_outbox.jsonl: the run was tracked as it went)")
        return 0
    if report.waiting:
        print(f"run.py track sync: error: the tracking server does not answer; still waiting in {report.outbox}: "
              f"{'; '.join(report.waiting)}. Run it again once the server is up", file=sys.stderr)
        return 1
    print(f"sent: {'; '.join(report.sent)}" if report.sent else "nothing left to send: the MLflow run already has it all")
    if report.lost:
        print(f"not kept, so not sent: {'; '.join(report.lost)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description=(
            "DF-DAM scene segmentation pipeline: synthetic data, WebDataset sharding, "
            "Ray Train training, Ray Tune search and MLflow tracking."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_make_synthetic(sub)
    _add_shard(sub)
    _add_profile(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_explain(sub)
    _add_tune(sub)
    _add_export(sub)
    _add_track(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: printed as one clear line, no traceback."""
    errors: list[type[BaseException]] = [FileNotFoundError, FileExistsError, NotADirectoryError, ConnectionError]
    for module, name in (("pipeline.config", "ConfigError"), ("sharding.manifest", "ManifestError"),
                         ("pipeline.tracking", "TrackingError"), ("pipeline.evaluate", "EvaluationError"),
                         ("pipeline.cluster", "ResourceError"), ("sharding.storage", "StorageError"),
                         ("pipeline.checkpoint", "CheckpointError")):
        mod = sys.modules.get(module)
        if mod is not None:
            errors.append(getattr(mod, name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"run.py {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is the user's to fix
        if isinstance(exc, _user_errors()):
            print(f"run.py {args.command}: error: {exc}", file=sys.stderr)
            return 2
        training = sys.modules.get("pipeline.train")
        if training is not None and isinstance(exc, training.TrainingError):
            print(f"run.py {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
