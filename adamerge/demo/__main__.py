"""The main job: real MobileNetV2 experts on five real image tasks, merged by layer-wise AdaMerging.

    python -m adamerge.demo [--quick] [--steps N] [--output runs/demo-vision]

Builds (or reuses from the cache) the ImageNet MobileNetV2 base, one expert per task fine-tuned by
adamerge on a seeded split of ``../shared/data``, unlabeled calibration and labelled test folders
(:mod:`adamerge.demo.vision`); then runs ``adamerge fit`` and prints the per-task accuracy of each
expert alone, task arithmetic (λ = 0.3) and layer-wise AdaMerging.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from adamerge.demo.vision import DEFAULT_TASKS, build_vision_demo
from adamerge.errors import AdamergeError
from adamerge.export import format_table
from adamerge.fit import FitSettings, run_fit


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small splits, 48 px, few steps (minutes)")
    parser.add_argument("--steps", type=int, default=None, help="AdaMerging steps (default 500, quick 30)")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--data-root", default=None, help="default: $ADAMERGE_DATA_ROOT or ../shared/data")
    parser.add_argument("--cache-dir", default=None, help="default: $ADAMERGE_CACHE or ~/.cache/adamerge/demo-vision")
    parser.add_argument("--output", type=Path, default=Path("runs/demo-vision"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        assets = build_vision_demo(data_root=args.data_root, cache_dir=args.cache_dir, tasks=args.tasks, quick=args.quick)
        settings = FitSettings(
            base=f"torchvision:mobilenet_v2@{assets.base}",
            experts={task: str(path) for task, path in assets.experts.items()},
            calib=assets.calib_dir,
            eval=assets.eval_dir,
            head_pattern=r"^classifier\.",
            batchnorm="per-task",  # each task's BatchNorm statistics, as its head (see adamerge.batchnorm)
            method="adamerging",
            granularity="layer",
            steps=args.steps or (30 if args.quick else 500),
            image_size=assets.image_size,
            output=args.output,
            overwrite=True,
            progress_bar=False,
        )
        metrics = run_fit(settings)
    except AdamergeError as error:
        logging.getLogger("adamerge").error("%s", error)
        return 2
    sys.stdout.write(format_table(metrics["accuracy"], list(assets.tasks)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
