"""``mimkit`` command line: thin parsing around the library."""

from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="preset name or YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from mimkit.config import load_config
    from mimkit.engine.trainer import pretrain

    if args.resume:  # the run's saved config (+ overrides); --config only starts a run not begun yet
        cfg = load_config(args.config, args.overrides) if args.config else None
        pretrain(cfg, args.out, resume=True, overrides=args.overrides)
    else:
        pretrain(load_config(args.config or "fmnist_tiny", args.overrides), args.out)


def _checkpoint_stats(path: str):
    from mimkit.config import config_from_dict
    from mimkit.data import stats_for
    from mimkit.engine.checkpoint import load_file

    saved = load_file(path).get("config")
    return stats_for(config_from_dict(saved)) if isinstance(saved, dict) else None


def cmd_visualize(args: argparse.Namespace) -> None:
    import mimkit
    from mimkit.data import dataset_stats
    from mimkit.viz import load_images, save_reconstruction_grid

    model = mimkit.load_model(args.checkpoint)
    if args.mean and args.std:
        mean, std = args.mean, args.std
    elif args.stats:
        mean, std = dataset_stats(args.stats, model.in_chans)
    else:  # a mimkit checkpoint knows its data's normalization; official ones use ImageNet's
        mean, std = _checkpoint_stats(args.checkpoint) or dataset_stats("folder", model.in_chans)
    imgs = load_images(args.images, model, mean, std, limit=args.num, on_corrupt=args.on_corrupt)
    import torch

    g = torch.Generator().manual_seed(args.seed)
    noise = torch.rand(imgs.shape[0], model.num_patches, generator=g)
    path = save_reconstruction_grid(model, imgs, args.out, mean, std, noise=noise,
                                    upscale=max(1, 128 // model.img_size[0]))
    print(f"wrote {path}")


def _numbers(kind: type):
    """An argparse type: a comma-separated list of ``kind`` (``5,10,20``)."""

    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
            if values:
                return values
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s such as "
                                         f"{'5,10,20' if kind is int else '0.01,0.07'}, got {text!r}")

    return parse


def cmd_eval(args: argparse.Namespace) -> None:
    from mimkit.eval.run import evaluate

    grid = (args.ks, args.temperatures) if getattr(args, "grid", False) else None
    record, path = evaluate(args.protocol, args.checkpoint, args.config, args.out, args.from_scratch,
                            args.overrides, args.weights, getattr(args, "pixels", False), grid)
    print(f"{record['metric']} = {100 * record['value']:.2f}%  ({record['timings']['wall_s']:.0f} s) -> {path}")
    per_class = record["details"].get("per_class_top1")
    if per_class:
        weakest = sorted(per_class.items(), key=lambda kv: kv[1])[:3]
        print("weakest classes: " + ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in weakest))
    folder = record["details"].get("classifier")
    if folder:
        print(f"classifier: {folder} (timm.create_model('local-dir:{folder}', pretrained=True))")


def cmd_export(args: argparse.Namespace) -> None:
    from mimkit.config import ConfigError
    from mimkit.engine.checkpoint import CheckpointError
    from mimkit.interop.convert import export

    if args.push_to_hub and not (args.format == "hf" or (args.format == "timm" and
                                                          not args.out.endswith(".safetensors"))):
        raise ConfigError("--push-to-hub uploads a folder: use --format hf, or --format timm with an "
                          "--out folder (not a .safetensors file)")
    try:
        info = export(args.checkpoint, args.format, args.out, args.encoder_only, args.weights)
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise ConfigError(str(e)) from None
    print(f"wrote {info['out']} ({info['format']}, {info['weights']} weights from a {info['source']} file)")
    if "create_model" in info:
        print(f"load it with: model = {info['create_model']}")
        if not info["folder"]:
            print("             model.load_state_dict(safetensors.torch.load_file(PATH), strict=True)")
    if args.push_to_hub:
        from mimkit.interop.hf import push_to_hub

        print(f"uploaded to {push_to_hub(info['out'], args.push_to_hub, private=args.private)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from mimkit.demo import run_demo

    report = run_demo(args.out, args.overrides)
    print(f"report: {report}")


def cmd_study(args: argparse.Namespace) -> None:
    from mimkit.study import run_study

    index = run_study(args.config, args.out, args.budget, args.overrides)
    print(f"study index: {index}\nwrite the report with: mimkit report --study {index.parent}")


def cmd_report(args: argparse.Namespace) -> None:
    from mimkit.study import write_report

    print(f"wrote {write_report(args.study, args.out)}")


def cmd_make_shards(args: argparse.Namespace) -> None:
    from mimkit.data.shards import write_shards

    out = write_shards(args.images, args.out, args.max_count, args.max_size, args.split)
    print(f"wrote {out.num_samples} samples ({len(out.classes)} classes) to {len(out.shards)} shards, "
          f"index {out.index}")


def cmd_data_fetch(args: argparse.Namespace) -> None:
    from mimkit.data.fetch import fetch

    print(f"{args.name} is ready in {fetch(args.name, args.root, apt_update=args.apt_update)}")


def cmd_config(args: argparse.Namespace) -> None:
    from mimkit.config import load_config
    from mimkit.config_doc import keys_table, show

    if args.action == "keys":
        print(keys_table(), end="")
    else:
        print(show(load_config(args.config, args.overrides)), end="")


def cmd_bench(args: argparse.Namespace) -> None:
    from mimkit.bench import main_from_args

    main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    from mimkit import __version__

    parser = argparse.ArgumentParser(prog="mimkit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mimkit {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: MIMKIT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train a ViT by masked image modeling")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (with --config: start it if it has not begun)")
    p.set_defaults(func=cmd_pretrain, resumes="continue with --resume")

    p = sub.add_parser("visualize", help="reconstruction grid for some images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True, nargs="+", help="image files or folders")
    p.add_argument("--out", default="reconstructions.png")
    p.add_argument("--num", type=int, default=8, help="at most this many images")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.add_argument("--stats", default=None,
                   help="data set whose mean/std normalise inputs (default: the checkpoint's, else ImageNet)")
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--on-corrupt", default="error", choices=["error", "skip"],
                   help="an unreadable image: stop with an error, or skip it (like data.on_corrupt)")
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("eval", help="evaluate an encoder: k-NN, linear probe or fine-tuning")
    protocols = p.add_subparsers(dest="protocol", required=True)
    for name, text in (("knn", "weighted cosine k-NN on frozen features"),
                       ("linprobe", "linear probe on frozen features (MAE protocol)"),
                       ("finetune", "end-to-end fine-tuning (MAE protocol)")):
        q = protocols.add_parser(name, help=text)
        q.add_argument("--checkpoint", default=None,
                       help="mimkit checkpoint, official MAE file, safetensors/timm export or HF folder")
        q.add_argument("--config", default=None,
                       help="preset or YAML file (default: the mimkit checkpoint's saved config)")
        q.add_argument("--out", default=None,
                       help="folder for eval_<protocol>.json (default: the checkpoint's folder)")
        q.add_argument("--from-scratch", action="store_true", help="same recipe from a random initialisation")
        if name != "finetune":
            q.add_argument("--pixels", action="store_true",
                           help="the same protocol on the input pixels themselves: the yardstick")
        if name == "knn":
            q.add_argument("--grid", action="store_true",
                           help="also score every k in --ks and T in --temperatures (one search; val split only)")
            q.add_argument("--ks", type=_numbers(int), default="5,10,20,50,100,200", metavar="K,K,...")
            q.add_argument("--temperatures", type=_numbers(float), default="0.005,0.01,0.02,0.04,0.07,0.1",
                           metavar="T,T,...")
        q.add_argument("--weights", default="auto", choices=["auto", "teacher", "student"])
        q.add_argument("overrides", nargs="*", help="key=value overrides (e.g. data.label_fraction=0.1)")
        q.set_defaults(func=cmd_eval, resumes=name == "finetune")  # only fine-tuning saves progress

    from mimkit.eval.consistency import add_consistency_args, run_consistency_cli

    q = protocols.add_parser("consistency", help="disagreement of predictions across random masks")
    add_consistency_args(q)
    q.set_defaults(func=run_consistency_cli)

    p = sub.add_parser("export", help="convert a checkpoint to timm, official MAE, HF or safetensors")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", required=True, choices=["timm", "mae", "hf", "safetensors"])
    p.add_argument("--out", required=True,
                   help="output file; a folder for hf, and for timm unless it ends in .safetensors")
    p.add_argument("--encoder-only", action="store_true", help="drop the decoder (mae, safetensors)")
    p.add_argument("--weights", default="auto", choices=["auto", "teacher", "student"],
                   help="RC-MAE-style checkpoints: auto = the evaluation weights (the teacher)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="upload the folder to this Hugging Face Hub model repo (needs a login)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="pre-train on Fashion-MNIST, evaluate, write a report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the fmnist_demo preset")
    p.set_defaults(func=cmd_demo, resumes=True)

    p = sub.add_parser("study", help="compare the methods on real data (cached, resumable)")
    p.add_argument("--config", default="fmnist_study", help="study preset or YAML file")
    p.add_argument("--out", default=None, help="study folder (re-running it resumes); default "
                   "$MIMKIT_CACHE/study/<name>, ~/.cache/mimkit unless set")
    p.add_argument("--budget", type=float, default=1.0, help="scale pre-training wall-clock and "
                   "fine-tuning length; below 1 a quick look: fewer seeds, evaluation points, arms and "
                   "fine-tuning jobs, as the study file marks them (0.25 with fmnist_study: 53 min "
                   "measured on 2 CPU cores)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (study.seeds=[0], train.batch_size=128)")
    p.set_defaults(func=cmd_study, resumes=True)

    p = sub.add_parser("report", help="write RESULTS.md and its plots from a study folder")
    p.add_argument("--study", default=None, help="study folder (default: fmnist_study's)")
    p.add_argument("--out", default="docs/RESULTS.md", help="markdown file (plots go beside it)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("data", help="data sets: fetch Fashion-MNIST, MNIST, CIFAR-10/100")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("fetch", help="download (or unpack a local copy of) a data set; training never downloads")
    q.add_argument("name", choices=["fashion_mnist", "mnist", "cifar10", "cifar100"])
    q.add_argument("--root", default=None, help="folder to put it in (default: $MIMKIT_CACHE or ~/.cache/mimkit)")
    q.add_argument("--apt-update", action="store_true",
                   help="fashion_mnist via Debian's package: run apt-get update if apt-get download fails (root)")
    q.set_defaults(func=cmd_data_fetch)

    p = sub.add_parser("make-shards", help="write an image folder to WebDataset shards plus a wids index")
    p.add_argument("--images", required=True, help="image folder (class sub-folders give labels)")
    p.add_argument("--out", required=True, help="output folder (shard-000000.tar, ..., index.json)")
    p.add_argument("--max-count", type=int, default=10000, help="samples per shard at most")
    p.add_argument("--max-size", type=int, default=None, help="bytes per shard at most (about)")
    p.add_argument("--split", default="train", help="train | test, for folders with train/ and test/")
    p.set_defaults(func=cmd_make_shards)

    p = sub.add_parser("config", help="print the merged config (with comments) or list the keys")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("show", help="the config as YAML: each key, its comment, and its default "
                                        "where the value differs")
    q.add_argument("--config", default=None, help="preset name or YAML file (default: the defaults)")
    q.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    q.set_defaults(func=cmd_config)
    q = actions.add_parser("keys", help="every key with its type, default and comment")
    q.set_defaults(func=cmd_config)

    from mimkit.bench import add_arguments as add_bench_arguments

    p = sub.add_parser("bench", help="time pre-training steps against transformers and lightly")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def resume_hint(args: argparse.Namespace) -> str:
    """How to continue a stopped command, from its parser's ``resumes`` default: a hint of its own
    (pretrain's --resume), True for the commands that pick up their saved progress by themselves
    (demo, study, eval finetune), or nothing for those that start over (k-NN, probe, export, ...)."""
    resumes = getattr(args, "resumes", False)  # not "resume": pretrain's --resume flag
    if isinstance(resumes, str):
        return f"; {resumes}"
    command = " ".join(filter(None, (args.command, getattr(args, "protocol", None))))
    return f"; run the same {command} command again to resume" if resumes else ""


def main(argv: list[str] | None = None) -> int:
    import os

    from mimkit.errors import MimkitError

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("MIMKIT_DEBUG", "") not in ("", "0")
    try:
        args.func(args)
    except MimkitError as e:
        if debug:
            raise
        print(f"mimkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mimkit: interrupted{resume_hint(args)}", file=sys.stderr)
        return 130
    except Exception as e:
        from mimkit.engine.signals import EXIT_PREEMPTED, Preempted

        if not isinstance(e, Preempted):
            raise
        print(f"mimkit: {e.saved}{resume_hint(args)}", file=sys.stderr)
        return EXIT_PREEMPTED  # saved but unfinished: a `&&` chain must not go on
    return 0


if __name__ == "__main__":
    sys.exit(main())
