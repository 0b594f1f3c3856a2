"""``selfsight <verb>``: pretrain, tokenizer train, eval knn|linear|finetune|seg|health, pictures, report,
compare, demo, methods, export, embed, neighbors, shards make, --version.

Errors are one line on stderr and exit code 2 (set SELFSIGHT_DEBUG=1 for the traceback).
Multi-process: ``torchrun --nproc_per_node N -m selfsight pretrain ...`` (see docs/distributed.md).
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
from pathlib import Path

from selfsight import __version__
from selfsight.config import FEATURES_HELP, check_sections, parse_features, read_sources, recipes_dir


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def default_recipe(method: str | None, data: str | None) -> str | None:
    """The bundled recipe for a method and built-in data set, e.g. ``simclr_fashion_mnist``."""
    if not method or not data:
        return None
    name = f"{method}_{data.partition(':')[0].replace('-', '_')}"
    return str(recipes_dir() / f"{name}.yaml") if (recipes_dir() / f"{name}.yaml").exists() else None


BUDGET_KEYS = ("steps", "epochs", "minutes")
CHECKPOINT_FILE = "checkpoint.pt"          # engine.trainer.CHECKPOINT (not imported: it loads torch)


def _budget_flags(args, flags: dict) -> dict:
    for key in BUDGET_KEYS:
        if getattr(args, key) is not None:
            flags.setdefault("train", {})[key] = getattr(args, key)
    if args.data:
        flags.setdefault("data", {})["train"] = args.data
    if getattr(args, "batch_size", None):
        flags.setdefault("data", {})["batch_size"] = args.batch_size
    return flags


def _budget_given(args) -> bool:
    """A budget on this command line: --steps/--epochs/--minutes or train.steps=... settings."""
    keys = {f"train.{k}" for k in BUDGET_KEYS}
    return any(getattr(args, k) is not None for k in BUDGET_KEYS) or \
        any(o.partition("=")[0].strip() in keys for o in args.overrides)


def _check_resume(args) -> None:
    """``--resume`` needs a checkpoint in --out (starting fresh is never implicit);
    ``--auto-resume`` continues when there is one and starts a new run when there is none."""
    out = Path(args.out)
    ck = out / CHECKPOINT_FILE
    if getattr(args, "auto_resume", False):
        args.resume = ck.exists()
        logging.getLogger("selfsight").info("--auto-resume: %s", f"continuing from {ck}" if args.resume
                                            else f"no checkpoint in {out} yet, starting a new run")
        return
    if not args.resume or ck.exists():
        return
    if not out.exists():
        why = f"{out} does not exist (a typo in --out?)"
    elif (out / "config.yaml").exists():
        why = (f"the run in {out} stopped before its first checkpoint (train.checkpoint_every); "
               "start it again without --resume")
    else:
        why = f"{out} holds no run"
    raise ValueError(f"--resume: nothing to resume, {why}; to start a new run, leave out --resume")


def _run_config(args, flags: dict, recipe: str | None):
    """The run's config: its saved config when resuming, else --config or the bundled ``recipe``,
    then the CLI flags and key=value overrides. A budget given with --resume replaces the saved
    one (steps, epochs and minutes together): the run then trains to the new budget."""
    _check_resume(args)
    files = []
    saved = Path(args.out) / "config.yaml"
    if args.resume and saved.exists():
        files.append(str(saved))                         # the run's own resolved config comes first
        if _budget_given(args):
            train = flags.setdefault("train", {})
            for key in BUDGET_KEYS:
                train.setdefault(key, 0)
    elif args.config:
        files.append(args.config)
    elif recipe:
        logging.getLogger("selfsight").info("using the bundled recipe %s", recipe)
        files.append(recipe)
    if args.resume and args.config and saved.exists():
        files.append(args.config)
    tree = read_sources(files, args.overrides, flags)
    check_sections(tree)                    # typos outside the method section fail before torch loads
    from selfsight.resolve import build_config  # lazy: keeps selfsight --help and these checks free of torch
    return build_config(tree)


def _exit_code(result: dict) -> int:
    """0 for a finished run; 128 + the signal's number for one stopped by SIGINT (130) or SIGTERM
    (143) after writing its checkpoint, so that ``pretrain && eval`` stops after an interrupt."""
    return 128 + result["signal"] if result.get("signal") else 0


def cmd_pretrain(args) -> int:
    flags: dict = {}
    if args.method:
        flags.setdefault("method", {})["name"] = args.method
    if args.backbone:
        flags.setdefault("backbone", {})["name"] = args.backbone
    cfg = _run_config(args, _budget_flags(args, flags),
                      default_recipe(args.method or "simclr", args.data or "fashion-mnist"))
    from selfsight.engine.trainer import pretrain  # lazy: keeps --help and the config checks free of torch
    result = pretrain(cfg, args.out, resume=args.resume)
    print(json.dumps(result))
    return _exit_code(result)


def cmd_tokenizer_train(args) -> int:
    """Train a dVAE, VQ-VAE or VQ-KD tokenizer; writes RUN/tokenizer.pt (docs/tokenizers.md)."""
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
    from selfsight.engine.trainer import pretrain  # lazy: keeps --help and the config checks free of torch
    result = pretrain(cfg, args.out, resume=args.resume)
    result["tokenizer"] = str(Path(args.out) / "tokenizer.pt")
    print(json.dumps(result))
    return _exit_code(result)


def _finish_eval(args, res: dict, line: str) -> int:
    """Print an evaluation's result (one JSON object with --json, else ``line``); --save also keeps
    it as RUN/eval/PROTOCOL[_BASELINE].json for `selfsight report`/`compare`."""
    if getattr(args, "save", False):
        from selfsight.report import save_eval  # lazy: keeps selfsight --help free of torch
        save_eval(args.run, args.protocol, res)
    print(json.dumps(res) if args.json else line)
    return 0


def _classes(res: dict) -> str:
    from selfsight.eval.labels import describe_classes  # lazy: keeps selfsight --help free of torch
    return f"\n  scored on {describe_classes(res)}"


def cmd_eval_knn(args) -> int:
    from selfsight.eval.knn import evaluate_knn  # lazy: keeps selfsight --help free of torch
    res = evaluate_knn(args.run, args.train, args.test, args.k, args.temperature, args.baseline,
                       device=args.device, data_root=args.data_root, features=args.features,
                       unknown_classes=args.unknown_classes)
    line = (f"kNN (k={res['k']}, T={res['temperature']}) {res['model']} {res['method']}/{res['backbone']} "
            f"on {res['test']}: top-1 {res['top1']:.4f}  top-5 {res['top5']:.4f}{_classes(res)}")
    return _finish_eval(args, res, line)


def cmd_eval_linear(args) -> int:
    from selfsight.eval.linear import evaluate_linear  # lazy: keeps selfsight --help free of torch
    if args.full:                       # frozen backbone, augmented images every epoch, SGD + cosine
        from selfsight.eval.linear_full import evaluate_linear_full
        res = evaluate_linear_full(args.run, args.train, args.test, args.baseline, device=args.device,
                                   data_root=args.data_root, features=args.features, epochs=args.epochs,
                                   lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                                   warmup_epochs=args.warmup_epochs, batchnorm=not args.no_batchnorm,
                                   workers=args.workers, crop_scale=(args.crop_min, 1.0),
                                   unknown_classes=args.unknown_classes)
    else:
        res = evaluate_linear(args.run, args.train, args.test, args.baseline, device=args.device,
                              data_root=args.data_root, features=args.features, epochs=args.epochs,
                              batchnorm=not args.no_batchnorm, unknown_classes=args.unknown_classes)
    line = (f"{'full ' if args.full else ''}linear probe ({args.epochs} epochs, lr {res['lr']}, "
            f"wd {res['weight_decay']}) {res['model']} {res['method']}/{res['backbone']} on {res['test']}: "
            f"top-1 {res['top1']:.4f}  top-5 {res['top5']:.4f}{_classes(res)}")
    return _finish_eval(args, res, line)


def cmd_eval_finetune(args) -> int:
    from selfsight.eval.finetune import finetune  # lazy: keeps selfsight --help free of torch
    res = finetune(args.run, args.train, args.test, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                   layer_decay=args.layer_decay, label_smoothing=args.label_smoothing, weight_decay=args.weight_decay,
                   warmup_epochs=args.warmup_epochs, drop_path=args.drop_path, features=args.features,
                   optimizer=args.optimizer, device=args.device, baseline=args.baseline,
                   max_train_images=args.images, data_root=args.data_root, head_norm=args.head_norm,
                   unknown_classes=args.unknown_classes)
    line = (f"fine-tune ({res['epochs']} epochs, {res['optimizer']}, lr {res['lr']:.3g}, layer decay "
            f"{res['layer_decay']}) {res['model']} {res['method']}/{res['backbone']} on {res['test']}: "
            f"top-1 {res['top1']:.4f}  top-5 {res['top5']:.4f}{_classes(res)}")
    return _finish_eval(args, res, line)


def cmd_eval_seg(args) -> int:
    from selfsight.eval.dense import evaluate_segmentation  # lazy: keeps selfsight --help free of torch
    res = evaluate_segmentation(args.run, args.train, args.test, args.baseline, device=args.device,
                                data_root=args.data_root, size=args.size, blocks=args.blocks, epochs=args.epochs,
                                max_train_images=args.images)
    worst = sorted(res["iou"].items(), key=lambda kv: kv[1])
    per_class = ", ".join(f"{name} {v:.3f}" for name, v in worst)
    skipped = f"\n  {res['skipped']} images skipped (lines above)" if res["skipped"] else ""
    line = (f"linear segmentation ({res['epochs']} epochs, lr {res['lr']}, wd {res['weight_decay']}; "
            f"{res['tokens']} tokens of {res['size']} px images, {res['feature_dim']}-d, last "
            f"{'block' if res['blocks'] == 1 else str(res['blocks']) + ' blocks'}) {res['model']} "
            f"{res['method']}/{res['backbone']} on {res['test']} ({res['test_images']} images): "
            f"mIoU {res['miou']:.4f}  pixel accuracy {res['pixel_accuracy']:.4f}\n"
            f"  IoU per class, worst first: {per_class}{skipped}")
    return _finish_eval(args, res, line)


def cmd_eval_health(args) -> int:
    from selfsight.eval.health import evaluate_health  # lazy: keeps selfsight --help free of torch
    res = evaluate_health(args.run, args.data, n_images=args.images, baseline=args.baseline, device=args.device,
                          features=args.features, data_root=args.data_root)
    line = (f"health of {res['model']} {res['method']}/{res['backbone']} ({res['features']}, {res['feature_dim']}-d) "
            f"on {res['n_images']} images of {res['data']}: RankMe {res['rankme']:.2f} (max {res['rankme_max']})  "
            f"alignment {res['alignment']:.4f}  uniformity {res['uniformity']:.4f}  "
            f"std {res['embedding_std']:.4f} ({res['embedding_std_ratio']:.3f} x 1/sqrt(D))")
    return _finish_eval(args, res, line)


def cmd_pictures(args) -> int:
    """Embedding maps, retrieval grid, ViT attention, the method's own pictures, curves (docs/usage.md)."""
    from selfsight.viz.pictures import write_pictures  # lazy: keeps selfsight --help free of torch
    written = write_pictures(args.run, args.data, args.out, n=args.images, maps=tuple(args.map or ["pca"]),
                             features=args.features, device=args.device or "cpu", data_root=args.data_root)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def cmd_report(args) -> int:
    from selfsight.report import write_report  # lazy: keeps selfsight --help free of torch
    print(write_report(args.run, args.out))
    return 0


def cmd_compare(args) -> int:
    from selfsight.report import compare_rows, compare_table  # lazy: keeps selfsight --help free of torch
    rows = compare_rows(args.runs)
    print(json.dumps(rows) if args.json else compare_table(rows))
    return 0


def cmd_export(args) -> int:
    """The evaluation backbone alone: safetensors / torchvision / timm / hub folder / ONNX (docs/api.md)."""
    from selfsight.deploy import export  # lazy: keeps selfsight --help free of torch
    meta = export(args.run, args.out, args.format)
    if args.json:
        print(json.dumps({"out": args.out, **{k: v for k, v in meta.items() if k != "config"}}))
    else:
        print(f"exported {meta['method']}/{meta['backbone']} ({meta['feature_dim']}-d features, "
              f"{meta['image_size']} px, {meta['channels']} channels) as {args.format} -> {args.out}\n"
              f"load with: {_load_hint(meta, args.format, args.out)}")
    return 0


def _load_hint(meta: dict, fmt: str, out: str) -> str:
    """How to load an export, as one line of Python."""
    if fmt == "onnx":
        return (f"onnxruntime.InferenceSession({out!r}).run(None, {{'image': x}}) with x float32 "
                f"B×{meta['channels']}×{meta['image_size']}×{meta['image_size']}, normalized as {out}.json says "
                "(selfsight.load_backbone reads safetensors/torch exports and runs)")
    if fmt == "hf":
        if "timm" in meta:
            return f"timm.create_model('local-dir:{out}', pretrained=True), or selfsight.load_backbone({out!r})"
        return f"selfsight.load_backbone({out!r}) (torchvision state in {out}/model.safetensors)"
    read = f"safetensors.torch.load_file({out!r})" if out.lower().endswith(".safetensors") \
        else f"torch.load({out!r}, weights_only=True)"
    if fmt in ("torchvision", "timm"):
        spec = meta.get("torchvision") or meta.get("timm") or {}
        build = spec.get("build", "") if fmt == "timm" or spec.get("stock") else \
            f"selfsight.deploy.torchvision_model(selfsight.deploy.read_metadata({out!r}))"
        return f"{build}.load_state_dict({read}) (strict), or selfsight.load_backbone({out!r})"
    return f"selfsight.load_backbone({out!r}) (the state dict itself: {read})"


def cmd_embed(args) -> int:
    """Embeddings of every image in a folder (resumable: run the same command again after a stop)."""
    from selfsight.deploy import embed  # lazy: keeps selfsight --help free of torch
    res = embed(args.model, args.folder, args.out, batch_size=args.batch_size, workers=args.workers,
                device=args.device, shard_size=args.shard_size, progress=not args.json)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['count']} embeddings ({res['dim']}-d; {res['skipped']} unreadable images skipped; "
              f"{res['shards_reused']} of {res['shards']} shards reused) -> {', '.join(res['written'])}")
    return 0


def cmd_neighbors(args) -> int:
    from selfsight.deploy import neighbors  # lazy: keeps selfsight --help free of torch
    rows = neighbors(args.embeddings, args.query, args.k, args.picture, args.model, args.backend)
    if args.json:
        print(json.dumps(rows))
    else:
        query = args.query
        if str(query).isdigit() and not Path(query).exists():        # a row of the collection: name it
            from selfsight.deploy import load_embeddings
            names = load_embeddings(args.embeddings)[1]
            query = f"image {query} ({names[int(query)]})"
        print(f"the {len(rows)} images of {args.embeddings} nearest to {query} (cosine similarity; the query "
              f"itself left out):\nrank   score    index  file")
        for r in rows:
            print(f"{r['rank'] + 1:4d}  {r['score']:.4f}  {r['index']:7d}  {r['file']}")
        if args.picture:
            print(f"picture -> {args.picture}")
    return 0


def cmd_shards_make(args) -> int:
    from selfsight.data import build_dataset  # lazy: keeps selfsight --help free of torch
    from selfsight.data.shards import write_shards
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    result = write_shards(build_dataset(args.src, args.data_root), args.out, args.shard_size)
    print(json.dumps(result))
    return 0


def cmd_methods(args) -> int:
    from selfsight.backbones import BACKBONES  # lazy: keeps selfsight --help free of torch
    from selfsight.methods import METHODS
    print("methods:")
    for name in METHODS.names():
        print(f"  {name:10s} {METHODS.get(name).summary}")
    print("backbones:\n  " + ", ".join(BACKBONES.names())
          + "\n  timm:NAME (any of timm.list_models()), torchvision:NAME (any of torchvision.models.list_models()),"
          "\n  python:package.module:factory (your own network; docs/usage.md: Backbones)")
    print("recipes (--config NAME):\n  " + ", ".join(sorted(p.stem for p in recipes_dir().glob("*.yaml"))))
    return 0


def cmd_demo(args) -> int:
    """The README's main job: SimCLR on Fashion-MNIST, then kNN beside the two baselines."""
    from selfsight.engine.trainer import pretrain  # lazy: keeps selfsight --help free of torch
    from selfsight.eval.knn import evaluate_knn
    from selfsight.resolve import load_config
    out = Path(args.out)
    resume = (out / "checkpoint.pt").exists()
    overrides = [f"train.minutes={args.minutes}"] + args.overrides
    cfg = load_config([str(recipes_dir() / "simclr_fashion_mnist.yaml")], overrides)
    if not resume:
        res = pretrain(cfg, out)
        if res.get("signal"):
            print(f"interrupted at step {res['steps']} (checkpoint written); `selfsight pretrain --out {out} --resume` "
                  "continues it", file=sys.stderr)
            return _exit_code(res)
        print(f"pretrained {res['steps']} steps ({res['epochs']:.2f} epochs) in {res['minutes']:.1f} min -> {out}")
    else:
        print(f"{out} already holds a pretrained run; evaluating it (delete the folder to train again)")
    rows = []
    print("kNN evaluation: features of the 70,000 Fashion-MNIST images for the trained backbone and the two "
          "baselines (a few minutes on a CPU)", flush=True)
    for baseline, label in ((None, "SimCLR (trained)"), ("pixels", "raw pixels (mean-centred)"),
                            ("random", f"{cfg.backbone.name} at random init")):
        r = evaluate_knn(str(out), "fashion-mnist", "fashion-mnist:test", cfg.eval.knn_k, cfg.eval.knn_temperature,
                         baseline)
        rows.append((label, r["top1"], r["top5"]))
        print(f"  {label}: top-1 {r['top1']:.4f} ({r['seconds']:.0f} s)", flush=True)
    print(f"\nkNN on Fashion-MNIST test (10,000 images; bank = 60,000 train; k={cfg.eval.knn_k}, "
          f"T={cfg.eval.knn_temperature})")
    print(f"| {'features':32s} | top-1  | top-5  |\n|{'-' * 34}|--------|--------|")
    for label, t1, t5 in rows:
        print(f"| {label:32s} | {t1:.4f} | {t5:.4f} |")
    return 0


def _run_options(p: argparse.ArgumentParser, out_help: str, override_example: str) -> None:
    """The options of a training run: data, output folder, budget, recipe, resume, overrides."""
    p.add_argument("--data", help="built-in set (fashion-mnist, cifar10, cifar100, stl10[:split]), a folder of "
                                  "images, a list of files (list.csv, .tsv or .txt: path[,label]), hf:PATH[:split] "
                                  "(a local Hugging Face data set) or tar shards (default: the recipe's; "
                                  "fashion-mnist)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--minutes", type=float, help="budget: minutes of training (over all sessions of the run)")
    p.add_argument("--epochs", type=float, help="budget: passes over the data (fractions allowed)")
    p.add_argument("--steps", type=int, help="budget: optimizer steps")
    p.add_argument("--batch-size", type=int, help="global batch size over all processes (default: the recipe's)")
    p.add_argument("--config", help="YAML recipe: a file or a bundled name (see `selfsight methods`)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its checkpoint (an error when there is none); a budget "
                        "given with it replaces the run's budget")
    p.add_argument("--auto-resume", action="store_true",
                   help="continue from OUT's checkpoint when there is one, else start a new run (for schedulers "
                        "that rerun the same command)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"config settings anywhere on the line, e.g. {override_example}")


def _eval_options(p: argparse.ArgumentParser, train_help: str) -> None:
    """The options every frozen-feature evaluation shares (the --train/--test/--json conventions)."""
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--train", required=True, help=train_help)
    p.add_argument("--test", required=True, help="labeled data to classify")
    _features_option(p)
    p.add_argument("--baseline", choices=["pixels", "random"], help="evaluate a baseline instead of the trained backbone")
    p.add_argument("--unknown-classes", default="error", choices=["error", "wrong"],
                   help="test classes (matched to the training classes by name) that the training data lacks: "
                        "error (default), or wrong: keep their images and score them as wrong")
    _common_eval_options(p)


def _features_arg(value: str) -> str:
    try:
        parse_features(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _features_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", default="cls", type=_features_arg, metavar="{cls,mean,cls+mean,lastN,lastN+mean}",
                   help=f"{FEATURES_HELP} (default cls)")


def _common_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--data-root", default="", help="where built-in sets live ($SELFSIGHT_DATA)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save", action="store_true", help="also write the result to RUN/eval/ (for report/compare)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="selfsight", description="Image-only self-supervised learning.")
    ap.add_argument("--version", action="version", version=f"selfsight {__version__}")
    sub = ap.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("pretrain", help="pretrain an encoder without labels",
                       description="Pretrain an encoder without labels. A budget is needed: --steps, --epochs "
                                   "or --minutes (or train.steps/epochs/minutes in the recipe). Defaults: "
                                   "--method simclr, --data fashion-mnist, and the bundled recipe "
                                   "METHOD_DATA when one exists (`selfsight methods` lists them); key=value "
                                   "settings override any config key (docs/usage.md).")
    p.add_argument("--method", help="simclr, ... (see `selfsight methods`)")
    p.add_argument("--backbone", help="resnet18, vit_small, timm:NAME, torchvision:NAME, ... (see `selfsight methods`)")
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
    k.add_argument("--k", type=int, default=20, help="neighbours that vote (default 20)")
    k.add_argument("--temperature", type=float, default=0.07,
                   help="the votes weigh exp(cosine / T) (default 0.07, as DINO)")
    k.set_defaults(func=cmd_eval_knn)

    lp = esub.add_parser("linear", help="linear probe on frozen features (lr/wd chosen on held-out train data)")
    _eval_options(lp, "labeled data to fit the classifier")
    lp.add_argument("--epochs", type=int, default=30, help="training epochs of the classifier (default 30)")
    lp.add_argument("--no-batchnorm", action="store_true", help="no standardisation in front (MAE's BatchNorm)")
    lp.add_argument("--full", action="store_true",
                    help="the full path (GPU): frozen backbone, random-resized-crop + flip every epoch, SGD + cosine")
    lp.add_argument("--lr", type=float, default=0.1, help="--full: base learning rate for batch 256 (lr·B/256)")
    lp.add_argument("--batch-size", type=int, default=256, help="--full: batch size")
    lp.add_argument("--weight-decay", type=float, default=0.0, help="--full: weight decay of the linear layer")
    lp.add_argument("--warmup-epochs", type=float, default=0.0, help="--full: linear warm-up before the cosine")
    lp.add_argument("--crop-min", type=float, default=0.08, help="--full: smallest random-resized-crop area share")
    lp.add_argument("--workers", type=int, default=2, help="--full: DataLoader workers for folders")
    lp.set_defaults(func=cmd_eval_linear)

    ft = esub.add_parser("finetune", help="fine-tune the whole backbone with a new linear head (docs/usage.md)")
    _eval_options(ft, "labeled data to fine-tune on")
    ft.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    ft.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    ft.add_argument("--lr", type=float, help="base lr at batch 256, scaled by B/256 (default: ViTs 5e-4, ResNets 0.1)")
    ft.add_argument("--layer-decay", type=float, default=0.75, help="ViTs: layer-wise lr decay (default 0.75; 1 = off)")
    ft.add_argument("--label-smoothing", type=float, default=0.1, help="of the cross-entropy (default 0.1)")
    ft.add_argument("--weight-decay", type=float, help="default: ViTs 0.05 (AdamW), ResNets 1e-4 (SGD)")
    ft.add_argument("--warmup-epochs", type=float, help="default: a tenth of the epochs, at most 5")
    ft.add_argument("--drop-path", type=float, help="ViTs: stochastic depth of the last block (default 0.1)")
    ft.add_argument("--optimizer", default="auto", choices=["auto", "adamw", "sgd"],
                    help="auto: AdamW with layer decay for ViTs, momentum SGD for ResNets")
    ft.add_argument("--images", type=int, help="fine-tune on a random subset of this many training images")
    ft.add_argument("--head-norm", default="bn", choices=["bn", "none"],
                    help="bn (default): standardise the features (BatchNorm, no affine) before the new head; "
                         "none: the papers' bare linear head")
    ft.set_defaults(func=cmd_eval_finetune)

    sg = esub.add_parser("seg", help="linear segmentation on frozen patch tokens: mIoU (DINOv2's protocol, "
                                     "docs/dense.md)")
    sg.add_argument("run", help="run folder or checkpoint file")
    sg.add_argument("--train", required=True,
                    help="images with masks to fit the head: fashion-mnist-scenes, or a folder with images/ + masks/")
    sg.add_argument("--test", required=True, help="images with masks to score (fashion-mnist-scenes:test, a folder)")
    sg.add_argument("--baseline", choices=["random"], help="the same backbone at random initialisation")
    sg.add_argument("--size", type=int, help="image side fed to the backbone (default: the built-in set's own "
                                             "size; folders: the run's input size)")
    sg.add_argument("--blocks", type=int, default=1,
                    help="ViTs: concatenate the patch tokens of the last N blocks (DINOv2's 4-layer variant; "
                         "default 1)")
    sg.add_argument("--epochs", type=int, default=10, help="training epochs of the linear head (default 10)")
    sg.add_argument("--images", type=int, help="use at most this many training images")
    _common_eval_options(sg)
    sg.set_defaults(func=cmd_eval_seg)

    h = esub.add_parser("health", help="label-free health metrics: RankMe, alignment, uniformity, embedding std")
    h.add_argument("run", help="run folder or checkpoint file")
    h.add_argument("--data", required=True, help="images to measure on (labels not needed): built-in set or folder")
    h.add_argument("--images", type=int, default=4096, help="images drawn from --data (0 = all; default 4096)")
    _features_option(h)
    h.add_argument("--baseline", choices=["random"], help="the same backbone at random initialisation")
    _common_eval_options(h)
    h.set_defaults(func=cmd_eval_health)

    pic = sub.add_parser("pictures", help="write a run's pictures (embedding map, retrieval, attention, curves)")
    pic.add_argument("run", help="run folder or checkpoint file")
    pic.add_argument("--data", help="images to show: built-in set or folder (default: the run's held-out split)")
    pic.add_argument("--out", help="folder for the PNGs (default RUN/pictures)")
    pic.add_argument("--images", type=int, default=512, help="images drawn from --data (default 512)")
    pic.add_argument("--map", action="append", choices=["pca", "tsne", "umap"],
                     help="2-D map of the embeddings (repeatable; default pca; tsne needs scikit-learn, umap umap-learn)")
    _features_option(pic)
    pic.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    pic.add_argument("--data-root", default="", help="where built-in sets live ($SELFSIGHT_DATA)")
    pic.set_defaults(func=cmd_pictures)

    rp = sub.add_parser("report", help="one self-contained HTML page for a run")
    rp.add_argument("run", help="run folder")
    rp.add_argument("--out", help="HTML file (default RUN/report.html)")
    rp.set_defaults(func=cmd_report)

    cp = sub.add_parser("compare", help="a table of runs side by side")
    cp.add_argument("runs", nargs="+", help="run folders")
    cp.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    cp.set_defaults(func=cmd_compare)

    x = sub.add_parser("export", help="write the evaluation backbone alone (safetensors, torchvision, timm, hf, "
                                      "onnx)")
    x.add_argument("run", help="run folder or checkpoint file")
    x.add_argument("--out", required=True,
                   help="output file: .safetensors, or .pt/.pth (a torch state dict with FILE.json beside it); "
                        ".onnx for --format onnx; a folder (no suffix) for --format hf")
    x.add_argument("--format", default="safetensors", choices=["safetensors", "torchvision", "timm", "hf", "onnx"],
                   help="safetensors: selfsight's backbone; torchvision / timm: that library's state-dict keys "
                        "(strict=True); hf: a timm / Hugging Face hub folder (timm.create_model('local-dir:DIR', "
                        "pretrained=True)); onnx: x -> features (default safetensors)")
    x.add_argument("--json", action="store_true", help="print one JSON object")
    x.set_defaults(func=cmd_export)

    em = sub.add_parser("embed", help="embeddings of every image in a folder (resumable)")
    em.add_argument("model", help="exported .safetensors file, run folder or checkpoint")
    em.add_argument("folder", help="folder of images (searched recursively)")
    em.add_argument("--out", required=True, help="OUT.npy (+ OUT.files.txt, OUT.json) or OUT.parquet (pyarrow)")
    em.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    em.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    em.add_argument("--shard-size", type=int, default=4096, help="images per resumable shard")
    em.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    em.add_argument("--json", action="store_true", help="print one JSON object")
    em.set_defaults(func=cmd_embed)

    nb = sub.add_parser("neighbors", help="most similar images of an embedding file (cosine)")
    nb.add_argument("embeddings", help="output of `selfsight embed` (.npy or .parquet)")
    nb.add_argument("query", help="an index, a file name of the collection, or any image file")
    nb.add_argument("--k", type=int, default=10, help="neighbours to list, the query itself not counted (default 10)")
    nb.add_argument("--picture", help="write the query and its neighbours as a PNG")
    nb.add_argument("--model", help="model to embed a query image with (default: the collection's)")
    nb.add_argument("--backend", default="auto", choices=["auto", "torch", "faiss"],
                    help="exact search in torch, or faiss (auto: faiss for large collections when installed)")
    nb.add_argument("--json", action="store_true", help="print one JSON list")
    nb.set_defaults(func=cmd_neighbors)

    sh = sub.add_parser("shards", help="WebDataset-style tar shards (docs/data.md)")
    shsub = sh.add_subparsers(dest="action", required=True)
    shm = shsub.add_parser("make", help="write OUT/shard-000000.tar, ... and OUT/shards.json from a folder or built-in set")
    shm.add_argument("src", help="a folder of images or a built-in set (fashion-mnist, cifar10, ...)")
    shm.add_argument("out", help="folder for the shards")
    shm.add_argument("--shard-size", type=int, default=10000, help="images per shard (default 10000)")
    shm.add_argument("--data-root", default="", help="where built-in sets live ($SELFSIGHT_DATA)")
    shm.set_defaults(func=cmd_shards_make)

    m = sub.add_parser("methods", help="list methods, backbones and bundled recipes")
    m.set_defaults(func=cmd_methods)

    d = sub.add_parser("demo", help="the main job: SimCLR on Fashion-MNIST + kNN against baselines")
    d.add_argument("--minutes", type=float, default=10.0, help="minutes of pretraining (default 10)")
    d.add_argument("--out", default="runs/demo",
                   help="run folder (default runs/demo; one that holds a finished run is evaluated again)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config settings, e.g. data.batch_size=128")
    d.set_defaults(func=cmd_demo)
    return ap


def _mark_commands(parser: argparse.ArgumentParser, argv: list[str] = ()) -> None:
    """Each command's parser sets ``_parser`` to itself (its errors then show its own usage), and a
    missing required option is reported as the misspelling in ``argv`` that was probably meant for it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                p.set_defaults(_parser=p)
                p.error = _suggesting_error(p, argv)
                _mark_commands(p, argv)


def _suggesting_error(p: argparse.ArgumentParser, argv: list[str]):
    plain = p.error

    def error(message: str):
        if "arguments are required" in message:             # argparse says so before it names unknown options
            options = [o for a in p._actions for o in a.option_strings]
            for token in argv:
                name = token.partition("=")[0]
                close = difflib.get_close_matches(name, options, n=1, cutoff=0.6) if name.startswith("--") else []
                if name not in options and close:
                    plain(f"unknown option {name}; did you mean {close[0]}?")
        plain(message)
    return error


SETTING = re.compile(r"[A-Za-z_][\w.-]*=.*", re.S)


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with ``key=value`` settings accepted anywhere on the line (argparse takes the
    positional settings in one run only); an unknown option is named with the closest real one."""
    _mark_commands(parser, argv)
    args, extras = parser.parse_known_args(argv)
    own = getattr(args, "_parser", parser)
    settings = [x for x in extras if SETTING.fullmatch(x)]
    rest = [x for x in extras if not SETTING.fullmatch(x)]
    if rest:
        first = rest[0]
        if first.startswith("-"):
            options = [o for a in own._actions for o in a.option_strings]
            close = difflib.get_close_matches(first.partition("=")[0], options, n=1, cutoff=0.6)
            own.error(f"unknown option {first}" + (f"; did you mean {close[0]}?" if close else ""))
        own.error(f"unrecognized arguments: {' '.join(rest)}")
    if settings:
        if not hasattr(args, "overrides"):
            own.error(f"this command takes no key=value settings: {' '.join(settings)}")
        args.overrides = list(args.overrides) + settings
    return args


def overview(parser: argparse.ArgumentParser) -> str:
    """What ``selfsight`` alone prints: the commands, one line each, and the README's two commands."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    rows = "\n".join(f"  {name:11s} {helps.get(name, '')}" for name in sub.choices)
    return (f"selfsight {__version__}: image-only self-supervised learning\n\ncommands:\n{rows}\n\n"
            "get started (README):\n"
            "  bash scripts/install.sh && .venv/bin/selfsight demo      "
            "# 10 min of SimCLR on Fashion-MNIST, then kNN\n"
            "  bash scripts/install.sh --test && .venv/bin/python -m pytest -q -p no:cacheprovider   # the tests\n\n"
            "`selfsight COMMAND --help` lists a command's options.")


def _one_line(e: Exception) -> str:
    """The message of an error in one line: a KeyError's text without quotes; an error raised in a
    DataLoader worker (torch wraps it in a multi-line report) by its original last line."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if "Original Traceback" in msg:
        msg = [x for x in msg.splitlines() if x.strip()][-1]
    return msg


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        print(overview(parser))
        return 0
    args = parse_args(parser, argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, not a traceback
        if os.environ.get("SELFSIGHT_DEBUG"):
            raise
        print(f"selfsight: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
