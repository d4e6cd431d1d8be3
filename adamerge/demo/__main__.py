"""The main job: real MobileNetV2 experts on five real image tasks, merged by layer-wise AdaMerging.

    python -m adamerge.demo [--quick] [--steps N] [--output runs/demo-vision]

Builds (or reuses from the cache) the ImageNet MobileNetV2 base, one expert per task fine-tuned by
adamerge on a seeded split of ``../shared/data``, unlabeled calibration and labelled test folders
(:mod:`adamerge.demo.vision`); then runs ``adamerge fit`` with its defaults (the experts' image
size is the one option a merge cannot find by itself: they were fine-tuned at 64 px) and logs,
once, the per-task accuracy of each expert alone, task arithmetic (λ = 0.3) and layer-wise
AdaMerging, with the time of every stage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from adamerge.demo.vision import DEFAULT_TASKS, build_vision_demo
from adamerge.errors import AdamergeError


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
    from adamerge.run.fit import run_fit
    from adamerge.run.progress import Stages, quiet_third_party
    from adamerge.run.settings import FitSettings

    quiet_third_party()
    stages = Stages()
    try:
        with stages.stage("building the experts", total=len(args.tasks), unit="experts") as bar:
            assets = build_vision_demo(
                data_root=args.data_root,
                cache_dir=args.cache_dir,
                tasks=args.tasks,
                quick=args.quick,
                on_task_done=bar.advance,
            )
        settings = FitSettings(
            base=f"torchvision:mobilenet_v2@{assets.base}",
            experts={task: str(path) for task, path in assets.experts.items()},
            calib=assets.calib_dir,
            eval=assets.eval_dir,
            head_pattern=r"^classifier\.",
            steps=args.steps or (30 if args.quick else 500),
            image_size=assets.image_size,
            output=args.output,
            overwrite=True,
        )
        with stages.stage("adamerge fit"):
            run_fit(settings)  # logs the table and its own stages
    except AdamergeError as error:
        logging.getLogger("adamerge").error("%s", error)
        return 2
    logging.getLogger("adamerge.demo").info("main job: %s", stages.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
