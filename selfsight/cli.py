"""``selfsight <verb>``: pretrain, tokenizer train, eval knn|linear, demo, methods, --version.

Errors are one line on stderr and exit code 2 (set SELFSIGHT_DEBUG=1 for the traceback).
Multi-process: ``torchrun --nproc_per_node N -m selfsight pretrain ...`` (see docs/distributed.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from selfsight import __version__


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def default_recipe(method: str | None, data: str | None) -> str | None:
    """The bundled recipe for a method and built-in data set, e.g. ``simclr_fashion_mnist``."""
    from selfsight.config import recipes_dir
    if not method or not data:
        return None
    name = f"{method}_{data.partition(':')[0].replace('-', '_')}"
    return str(recipes_dir() / f"{name}.yaml") if (recipes_dir() / f"{name}.yaml").exists() else None


def _budget_flags(args, flags: dict) -> dict:
    for key, val in (("minutes", args.minutes), ("epochs", args.epochs), ("steps", args.steps)):
        if val is not None:
            flags.setdefault("train", {})[key] = val
    if args.data:
        flags.setdefault("data", {})["train"] = args.data
    if getattr(args, "batch_size", None):
        flags.setdefault("data", {})["batch_size"] = args.batch_size
    return flags


def _run_config(args, flags: dict, recipe: str | None):
    """The run's config: its saved config when resuming, else --config or the bundled ``recipe``,
    then the CLI flags and key=value overrides."""
    from selfsight.config import load_config
    files = []
    saved = Path(args.out) / "config.yaml"
    if args.resume and saved.exists():
        files.append(str(saved))                         # the run's own resolved config comes first
    elif args.config:
        files.append(args.config)
    elif recipe:
        logging.getLogger("selfsight").info("using the bundled recipe %s", recipe)
        files.append(recipe)
    if args.resume and args.config and saved.exists():
        files.append(args.config)
    return load_config(files, args.overrides, flags)


def cmd_pretrain(args) -> int:
    from selfsight.engine.trainer import pretrain
    flags: dict = {}
    if args.method:
        flags.setdefault("method", {})["name"] = args.method
    if args.backbone:
        flags.setdefault("backbone", {})["name"] = args.backbone
    cfg = _run_config(args, _budget_flags(args, flags),
                      default_recipe(args.method or "simclr", args.data or "fashion-mnist"))
    result = pretrain(cfg, args.out, resume=args.resume)
    print(json.dumps(result))
    return 0


def cmd_tokenizer_train(args) -> int:
    """Train a dVAE, VQ-VAE or VQ-KD tokenizer; writes RUN/tokenizer.pt (docs/tokenizers.md)."""
    from selfsight.engine.trainer import pretrain
    method = {"name": "tokenizer", "kind": "dvae" if args.kind == "dvae" else "vq",
              "target": "teacher" if args.kind == "vqkd" else "pixels"}
    if args.teacher:
        method["teacher"] = args.teacher
    if args.kind == "vqkd" and not (args.teacher or args.config or args.resume
                                    or any(o.startswith("method.teacher=") for o in args.overrides)):
        raise ValueError("--kind vqkd needs --teacher: a selfsight run folder (e.g. a DINO run) or timm:NAME "
                         "with method.teacher_weights=FILE")
    cfg = _run_config(args, _budget_flags(args, {"method": method}),
                      default_recipe(f"tokenizer_{args.kind}", args.data or "fashion-mnist"))
    result = pretrain(cfg, args.out, resume=args.resume)
    result["tokenizer"] = str(Path(args.out) / "tokenizer.pt")
    print(json.dumps(result))
    return 0


def cmd_eval_knn(args) -> int:
    from selfsight.eval.run_knn import evaluate_knn
    res = evaluate_knn(args.run, args.train, args.test, args.k, args.temperature, args.baseline,
                       device=args.device, data_root=args.data_root, features=args.features)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"kNN (k={res['k']}, T={res['temperature']}) {res['model']} {res['method']}/{res['backbone']} "
              f"on {res['test']}: top-1 {res['top1']:.4f}  top-5 {res['top5']:.4f}")
    return 0


def cmd_eval_linear(args) -> int:
    from selfsight.eval.run_knn import evaluate_linear
    res = evaluate_linear(args.run, args.train, args.test, args.baseline, device=args.device,
                          data_root=args.data_root, features=args.features, epochs=args.epochs,
                          batchnorm=not args.no_batchnorm)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"linear probe ({args.epochs} epochs, lr {res['lr']}, wd {res['weight_decay']}) {res['model']} "
              f"{res['method']}/{res['backbone']} on {res['test']}: top-1 {res['top1']:.4f}  top-5 {res['top5']:.4f}")
    return 0


def cmd_methods(args) -> int:
    from selfsight.backbones import BACKBONES
    from selfsight.config import recipes_dir
    from selfsight.methods import METHODS
    print("methods:")
    for name in METHODS.names():
        print(f"  {name:10s} {METHODS.get(name).summary}")
    print("backbones:\n  " + ", ".join(BACKBONES.names()))
    print("recipes (--config NAME):\n  " + ", ".join(sorted(p.stem for p in recipes_dir().glob("*.yaml"))))
    return 0


def cmd_demo(args) -> int:
    """The README's main job: SimCLR on Fashion-MNIST, then kNN beside the two baselines."""
    from selfsight.config import load_config, recipes_dir
    from selfsight.engine.trainer import pretrain
    from selfsight.eval.run_knn import evaluate_knn
    out = Path(args.out)
    resume = (out / "checkpoint.pt").exists()
    overrides = [f"train.minutes={args.minutes}"] + args.overrides
    cfg = load_config([str(recipes_dir() / "simclr_fashion_mnist.yaml")], overrides)
    if not resume:
        res = pretrain(cfg, out)
        print(f"pretrained {res['steps']} steps ({res['epochs']:.2f} epochs) in {res['minutes']:.1f} min -> {out}")
    else:
        print(f"{out} already holds a pretrained run; evaluating it (delete the folder to train again)")
    rows = []
    for baseline, label in ((None, "SimCLR (trained)"), ("pixels", "raw pixels (mean-centred)"),
                            ("random", f"{cfg.backbone.name} at random init")):
        r = evaluate_knn(str(out), "fashion-mnist", "fashion-mnist:test", cfg.eval.knn_k, cfg.eval.knn_temperature,
                         baseline)
        rows.append((label, r["top1"], r["top5"]))
    print(f"\nkNN on Fashion-MNIST test (10,000 images; bank = 60,000 train; k={cfg.eval.knn_k}, "
          f"T={cfg.eval.knn_temperature})")
    print(f"| {'features':32s} | top-1  | top-5  |\n|{'-' * 34}|--------|--------|")
    for label, t1, t5 in rows:
        print(f"| {label:32s} | {t1:.4f} | {t5:.4f} |")
    return 0


def _run_options(p: argparse.ArgumentParser, out_help: str, override_example: str) -> None:
    """The options of a training run: data, output folder, budget, recipe, resume, overrides."""
    p.add_argument("--data", help="built-in set (fashion-mnist, cifar10, ...) or a folder of images")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--minutes", type=float, help="wall-clock budget")
    p.add_argument("--epochs", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--config", help="YAML recipe (file or bundled name)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("overrides", nargs="*", help=f"key=value config overrides, e.g. {override_example}")


def _eval_options(p: argparse.ArgumentParser, train_help: str) -> None:
    """The options every frozen-feature evaluation shares (the --train/--test/--json conventions)."""
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--train", required=True, help=train_help)
    p.add_argument("--test", required=True, help="labeled data to classify")
    p.add_argument("--features", default="cls", choices=["cls", "mean", "cls+mean"],
                   help="ViTs: class token, mean of the patch tokens, or both concatenated (default cls)")
    p.add_argument("--baseline", choices=["pixels", "random"], help="evaluate a baseline instead of the trained backbone")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--data-root", default="", help="where built-in sets live ($SELFSIGHT_DATA)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="selfsight", description="Image-only self-supervised learning.")
    ap.add_argument("--version", action="version", version=f"selfsight {__version__}")
    sub = ap.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("pretrain", help="pretrain an encoder without labels")
    p.add_argument("--method", help="simclr, ... (see `selfsight methods`)")
    p.add_argument("--backbone", help="resnet18, vit_small, ... (see `selfsight methods`)")
    _run_options(p, "run folder (checkpoint, config, metrics, TensorBoard)", "optim.lr=0.1")
    p.set_defaults(func=cmd_pretrain)

    t = sub.add_parser("tokenizer", help="image tokenizers for BEiT-style targets")
    tsub = t.add_subparsers(dest="action", required=True)
    tt = tsub.add_parser("train", help="train a tokenizer on your images; writes OUT/tokenizer.pt")
    tt.add_argument("--kind", default="vq", choices=["vq", "dvae", "vqkd"],
                    help="vq: VQ-VAE (pixels); dvae: DALL-E's discrete VAE; vqkd: BEiT v2's VQ-KD (needs --teacher)")
    tt.add_argument("--teacher", help="vqkd: a selfsight run folder, or timm:NAME with method.teacher_weights=FILE")
    _run_options(tt, "run folder (checkpoint, tokenizer.pt, pictures, metrics)", "method.vocab_size=1024")
    tt.set_defaults(func=cmd_tokenizer_train)

    e = sub.add_parser("eval", help="evaluate a pretrained backbone")
    esub = e.add_subparsers(dest="protocol", required=True)
    k = esub.add_parser("knn", help="weighted kNN on frozen features (DINO protocol)")
    _eval_options(k, "labeled data for the feature bank")
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=0.07)
    k.set_defaults(func=cmd_eval_knn)

    lp = esub.add_parser("linear", help="linear probe on frozen features (lr/wd chosen on held-out train data)")
    _eval_options(lp, "labeled data to fit the classifier")
    lp.add_argument("--epochs", type=int, default=30)
    lp.add_argument("--no-batchnorm", action="store_true", help="no standardisation in front (MAE's BatchNorm)")
    lp.set_defaults(func=cmd_eval_linear)

    m = sub.add_parser("methods", help="list methods, backbones and bundled recipes")
    m.set_defaults(func=cmd_methods)

    d = sub.add_parser("demo", help="the main job: SimCLR on Fashion-MNIST + kNN against baselines")
    d.add_argument("--minutes", type=float, default=10.0)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("overrides", nargs="*")
    d.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, not a traceback
        if os.environ.get("SELFSIGHT_DEBUG"):
            raise
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"selfsight: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
