"""Train STDiT / MVDiT on OpenVid-1M-format data with FSDP2.

    python train/run.py                                   # the embedded default: a tiny STDiT on the generated
                                                          # sample set (CPU or GPU, a few minutes), then a
                                                          # sampled clip checked against its caption
    python train/run.py --quick                           # the same, shortened (CI)
    torchrun --nproc_per_node 8 train/run.py --config STDiT-16x256x256 \\
        --set csv_path=OpenVid-1M.csv --set video_root=video/ --set text_encoder=t5-v1_1-xxl/ --set vae=sd-vae-ft-ema/
    torchrun --nproc_per_node 2 train/run.py --device cpu  # CPU ranks (gloo)
    python train/run.py --resume outputs/default          # continue a run from its latest checkpoint

Configs: ``--config NAME`` takes one of ``train.config.TRAIN_CONFIGS``; ``--set field=value`` (repeatable)
overrides any :class:`train.config.TrainConfig` field; ``--max-steps``, ``--outdir`` are shortcuts. ``--resume
DIR`` reads ``DIR/config.json`` (then applies the overrides) and continues from ``DIR/checkpoints/latest``.

Outputs in ``outdir``: ``checkpoints/`` (DCP, atomic, every ``ckpt_every`` steps, at the end and on SIGTERM),
``losses.jsonl`` (per step: loss, step time, tokens/s, rank 0's peak memory), ``loss.png``, ``ema.safetensors``
(the EMA weights; loads into STDiT/MVDiT and upstream's models) and, with ``sample_at_end``, ``sample.mp4`` +
``sample.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `train` and `openvid_models` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import TRAIN_CONFIGS, apply_overrides  # noqa: E402

QUICK_OVERRIDES = ["max_steps=30", "ckpt_every=30", "sample_steps=5", "sample_set_clips=48"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python train/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", choices=sorted(TRAIN_CONFIGS),
                        help="a training config (default: tiny, the embedded default run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a TrainConfig field (repeatable), e.g. --set batch_size=4")
    parser.add_argument("--max-steps", type=int, help="shortcut for --set max_steps=N")
    parser.add_argument("--outdir", help="shortcut for --set outdir=DIR")
    parser.add_argument("--sp-size", type=int, help="shortcut for --set sp_size=N: split every sample's frames "
                        "over N ranks (sequence parallelism)")
    parser.add_argument("--resume", metavar="DIR", help="a run folder (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--quick", action="store_true", help="a shortened run for CI: " + " ".join(QUICK_OVERRIDES))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    base = dict(TRAIN_CONFIGS[args.config])
    if args.resume is not None:
        saved = Path(args.resume) / "config.json"
        if saved.is_file():  # the run's own settings; the command line's overrides still apply
            base = json.loads(saved.read_text())
            base = {k: tuple(v) if isinstance(v, list) else v for k, v in base.items()}
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    if args.outdir is not None:
        overrides.append(f"outdir={args.outdir}")
    if args.sp_size is not None:
        overrides.append(f"sp_size={args.sp_size}")
    return apply_overrides(base, overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = config_from_args(args)
    from train.trainer import train  # noqa: PLC0415  (torch and the models load after the arguments are checked)

    result = train(config, resume=args.resume, device=args.device, progress=not args.no_progress)
    if result.stopped_by_signal:
        return 0
    first, last = min(result.losses.items(), default=(0, float("nan"))), max(result.losses.items(),
                                                                              default=(0, float("nan")))
    if result.losses:
        print(f"loss: step {first[0]} {first[1]:.4f} -> step {last[0]} {last[1]:.4f}; outputs in {result.outdir}")
    if result.sample is not None:
        s = result.sample
        print(f"sample: {s['path']} for {s['caption']!r}")
        if s["matched"] is not None:
            print(f"describe_clip sees {s['description']}: "
                  f"{'matches' if s['matched'] else 'does NOT match'} the caption's colour and direction")
    return 0


if __name__ == "__main__":
    sys.exit(main())
