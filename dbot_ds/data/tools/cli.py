"""`dbot-ds shards convert | verify | inspect | index` (also `python -m data_tools ...`)."""

from __future__ import annotations

import argparse
import glob
import json
import sys

from dbot_ds.errors import run


def parse_bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("b")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)


def cmd_convert(args) -> int:
    from dbot_ds.data.tools import sources
    from dbot_ds.data.tools.convert import convert

    if args.imagefolder:
        items, classes = sources.imagefolder(args.imagefolder)
    elif args.val_images:
        if not args.val_labels:
            raise SystemExit("--val-images needs --val-labels (LOC_val_solution.csv or the devkit dir)")
        classes = None
        if args.classes:
            from dbot_ds.data.shards import read_manifest
            classes = read_manifest(args.classes).classes
        items, classes = sources.val_folder(args.val_images, args.val_labels, classes)
    else:
        items, classes = sources.ilsvrc_train_tar(args.ilsvrc_tar)
    manifest = convert(items, classes, args.out, prefix=args.prefix, seed=args.seed,
                       shard_size=None if args.shard_bytes else args.shard_size,
                       shard_bytes=parse_bytes(args.shard_bytes) if args.shard_bytes else None,
                       resize_short_side=args.resize_short_side, workers=args.workers)
    report = manifest.extra["report"]
    print(f"{len(manifest.shards)} shards, {manifest.total} samples, {len(classes)} classes -> "
          f"{args.out}/manifest.json")
    print(f"re-encoded: {json.dumps(report['reencoded'])}; unreadable: {report['unreadable']}")
    for e in report["errors"]:
        print(f"  unreadable: {e['path']}: {e['reason']}")
    return 0


def cmd_verify(args) -> int:
    from dbot_ds.data.tools.verify import verify

    problems = verify(args.manifest, pipe_urls=args.pipe_urls)
    for p in problems:
        print(p)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


def cmd_inspect(args) -> int:
    from dbot_ds.data.tools.verify import inspect

    print(inspect(args.manifest, args.n, pipe_urls=args.pipe_urls))
    return 0


def cmd_index(args) -> int:
    from dbot_ds.data.tools.verify import index

    from dbot_ds.data.shards import is_url

    # URLs (and names for --url-template) as given; local patterns expanded
    shards = sorted(s for pattern in args.shards
                    for s in ([pattern] if args.url_template or is_url(pattern) else glob.glob(pattern)))
    if not shards:
        raise SystemExit(f"no shard matches {args.shards}")
    m = index(shards, args.out, url_template=args.url_template)
    print(f"{len(m.shards)} shards, {m.total} samples -> {args.out}")
    return 0


def cmd_digits(args) -> int:
    from dbot_ds.data.tools.digits import write_digits

    train, val = write_digits(args.out, args.size)
    print(f"train: {train}\nval: {val}")
    return 0


def cmd_synthetic(args) -> int:
    import os

    from dbot_ds.data.generated import generated_shards

    manifest = generated_shards(args.out, args.images, args.seed, "natural", shard_size=args.shard_size,
                                resize_short_side=args.resize_short_side, workers=args.workers or os.cpu_count() or 1)
    print(f"{len(manifest.shards)} shards, {manifest.total} generated samples -> {args.out}/manifest.json")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("convert", help="images -> WebDataset shards + manifest.json (resumable)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--imagefolder", help="a tree <root>/<wnid>/<image>")
    src.add_argument("--val-images", help="flat ImageNet validation images (with --val-labels)")
    src.add_argument("--ilsvrc-tar", help="ILSVRC2012_img_train.tar (a tar of per-class tars), read in place")
    p.add_argument("--val-labels", help="LOC_val_solution.csv, or the ILSVRC2012 devkit directory")
    p.add_argument("--classes", help="a train manifest.json whose class index the validation set uses")
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", default="train", help="shard name prefix (train-000000.tar)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--shard-bytes", help="bytes per shard instead, e.g. 1GB")
    p.add_argument("--resize-short-side", type=int, help="write pre-resized shards (e.g. 256)")
    p.add_argument("--workers", type=int, default=1, help="parallel shard writers")
    p.set_defaults(func=cmd_convert)

    pipe = dict(action="store_true", help="allow the manifest's pipe: URLs (shell commands) to run")
    p = sub.add_parser("verify", help="counts, sha256 and every image against the manifest")
    p.add_argument("manifest")
    p.add_argument("--pipe-urls", **pipe)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="a few samples and the class histogram")
    p.add_argument("manifest")
    p.add_argument("--pipe-urls", **pipe)
    p.add_argument("-n", type=int, default=5)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("digits", help="scikit-learn's digits as labelled train/val shards (no download)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=40, help="side of the upscaled images")
    p.set_defaults(func=cmd_digits)

    p = sub.add_parser("synthetic", help="generated ImageNet-like JPEGs (500x375, ~100 KB) as shards: "
                       "end-to-end benchmarks without ImageNet")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--resize-short-side", type=int, help="write pre-resized shards (e.g. 256)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.set_defaults(func=cmd_synthetic)

    p = sub.add_parser("index", help="a manifest for existing shards, local or remote (e.g. timm/imagenet-1k-wds)")
    p.add_argument("shards", nargs="+", help="shard paths or glob patterns, URLs (pipe:..., https://...), or "
                   "names for --url-template")
    p.add_argument("--out", required=True, help="the manifest.json to write")
    p.add_argument("--url-template", help='turns a shard name into its URL, e.g. "pipe:aws s3 cp s3://b/{name} -"')
    p.set_defaults(func=cmd_index)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run(args.func, args, "python -m data_tools")


if __name__ == "__main__":
    sys.exit(main())
