"""Train the reference and a candidate pool, then select, export and write the family.

    python -m variants.train                          # Fashion-MNIST, the shipped pool
    python -m variants.train --device cuda --jobs 12
    python -m variants.train --data digits            # a named dataset
    python -m variants.train --data ~/photos --budget-ms 5 --device-profile rpi4
    python -m variants.train --data digits --recipe joint --out-dir families/digits-joint
    python -m variants.train --phase export           # export what is trained

Every model checkpoints after each epoch into ``RUN_DIR/NAME/ckpt.pt`` and resumes from
there when the command is started again; a finished model is ``RUN_DIR/NAME/final.pt``.
Phases: the reference and the plain candidates train first; the reference's logits on the
training images (plain and flipped) are then stored, and the distilled candidates learn
from them (storing the teacher's outputs instead of running it per batch makes distillation
as cheap as plain training on a CPU). ``--recipe joint`` trains a group of members
together on a loss that includes their ensemble's (``variants.joint``). Members are
selected on the validation split only; the held-out test set is evaluated after
selection, for the record.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from variants import FAMILIES_DIR, datasets, plans
from variants.datasets import DatasetError, Splits
from variants.plans import AUTO_RULES, FASHION_RULES, Recipe, Rules
from variants.trainer import log, pick_device, store_teacher, train_one

DEFAULT_RUN_DIR = Path("runs/family")
PLAN_NAMES = ("default", "smoke", "tiny")


def make_plan(name: str, recipe: str, splits: Splits) -> list[Recipe]:
    """The recipes to train: the dataset's pool ('default'), or a short one; with
    ``recipe`` joint, the reference and the joint group instead of the pool."""
    if name == "smoke":
        if splits.name != "fashion-mnist":
            raise DatasetError("--plan smoke is Fashion-MNIST's; use --plan tiny for other data")
        pool = plans.smoke_plan()
    elif name == "tiny":
        pool = plans.tiny_plan(splits.input.size)
    elif splits.name == "fashion-mnist":
        pool = plans.default_plan()
    else:
        pool = plans.auto_plan(splits.input.size, len(splits.train), splits.hflip)
    if recipe == "independent":
        return pool
    group = plans.joint_group(pool, splits.input.size, members=3 if name == "tiny" else 7)
    return (
        ([r for r in pool if r.name == "reference"] + group)
        if recipe == "joint"
        else (pool + group)
    )


def rules_for(args: argparse.Namespace, splits: Splits) -> Rules:
    base = (
        FASHION_RULES if splits.name == "fashion-mnist" and args.plan == "default" else (AUTO_RULES)
    )
    return Rules(
        min_macs_gain=args.min_macs_gain or base.min_macs_gain,
        min_cheapest_gain=args.min_cheapest_gain or base.min_cheapest_gain,
        min_cheapest_speedup=base.min_cheapest_speedup,
    )


def prune_to_budget(plan: list[Recipe], args: argparse.Namespace, splits: Splits) -> list[Recipe]:
    """Drop the candidates whose (untrained) graph misses the budget on the target device."""
    from variants import budget

    profile = budget.load_profile(args.device_profile)
    candidates = [r for r in plan if r.role != "reference"]
    lat = budget.untrained_latencies(candidates, splits, args.run_dir / "latency-untrained")
    keep, target = budget.within_budget(lat, args.budget_ms, profile)
    # A joint group trains as one: it stays whole if any member fits (selection filters).
    if any(r.name in keep for r in candidates if r.joint):
        keep |= {r.name for r in candidates if r.joint}
    dropped = sorted(r.name for r in candidates if r.name not in keep)
    log(
        "plan.budget",
        budget_ms=args.budget_ms,
        profile=profile.describe(),
        target_latency_ms=target,
        dropped=dropped,
    )
    return [r for r in plan if r.role == "reference" or r.name in keep]


def run_plan(plan: list[Recipe], args: argparse.Namespace, device: str, splits: Splits) -> None:
    """Train every recipe of the plan; with --jobs > 1, as parallel worker processes."""
    from variants.joint import train_joint

    run_dir: Path = args.run_dir
    done = {r.name for r in plan if (run_dir / r.name / "final.pt").exists()}
    pending = [r for r in plan if r.name not in done]
    # A joint group is one job: its members train together.
    jobs: list[list[Recipe]] = [[r] for r in pending if not r.joint]
    groups: dict[str, list[Recipe]] = {}
    for r in pending:
        if r.joint:
            groups.setdefault(r.joint, []).append(r)
    jobs += list(groups.values())
    teacher_ready = (run_dir / "teacher.pt").exists()
    limits = [r.train_limit for r in plan if r.distill]
    teacher_limit = 0 if not limits or 0 in limits else max(limits)

    def needs_teacher(job: list[Recipe]) -> bool:
        return any(r.distill for r in job)

    def run_job(job: list[Recipe]) -> None:
        if job[0].joint:
            train_joint(job, run_dir, device, args.progress, splits)
        else:
            train_one(job[0], run_dir, device, args.progress, splits)

    if args.jobs <= 1:
        for job in sorted(jobs, key=lambda j: (needs_teacher(j), j[0].role != "reference")):
            if needs_teacher(job) and not teacher_ready:
                store_teacher(run_dir, device, splits, teacher_limit)
                teacher_ready = True
            run_job(job)
        return

    running: dict[str, subprocess.Popen[bytes]] = {}
    failed: list[str] = []
    while jobs or running:
        for name, proc in list(running.items()):
            rc = proc.poll()
            if rc is not None:
                del running[name]
                if rc != 0:
                    failed.append(name)
                    log("train.worker_failed", model=name, returncode=rc)
        if not teacher_ready and (run_dir / "reference" / "final.pt").exists():
            store_teacher(run_dir, device, splits, teacher_limit)
            teacher_ready = True
        if "reference" in failed:
            jobs = [j for j in jobs if not needs_teacher(j)]
        ready = [j for j in jobs if not needs_teacher(j) or teacher_ready]
        while ready and len(running) < args.jobs:
            job = ready.pop(0)
            jobs.remove(job)
            names = ",".join(r.name for r in job)
            cmd = [
                sys.executable,
                "-m",
                "variants.train",
                *args.data_flags,
                "--run-dir",
                str(run_dir),
                "--plan",
                args.plan,
                "--recipe",
                args.recipe,
                "--device",
                device,
                "--only",
                names,
                "--phase",
                "train",
                "--jobs",
                "1",
                "--threads",
                "1",
                "--no-progress",
            ]
            running[names] = subprocess.Popen(cmd)
            log("train.worker_started", model=names)
        time.sleep(0.5)
    if failed:
        raise SystemExit(f"error: training failed for {', '.join(failed)}; see the log above")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m variants.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        default=datasets.DEFAULT,
        help="fashion-mnist (default), digits, or the path of an image folder with "
        "one subfolder per class (optionally inside train/ val/ test/)",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=[1, 3],
        default=None,
        help="image folders: 1 (grayscale) or 3 (RGB); default: from the images",
    )
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="image folders: the family's input side in pixels; default: the "
        "images' median shorter side, 8..64",
    )
    p.add_argument(
        "--decode-workers",
        type=int,
        default=1,
        help="image folders: processes that decode images into the cache (default: 1)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="image folders: where decoded images are cached (default: RUN_DIR/cache)",
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="where checkpoints live (default: runs/family for Fashion-MNIST, runs/NAME otherwise)",
    )
    p.add_argument(
        "--plan",
        choices=PLAN_NAMES,
        default="default",
        help="default: the dataset's candidate pool; smoke (Fashion-MNIST) and tiny "
        "(any data): minutes- and seconds-long end-to-end checks",
    )
    p.add_argument(
        "--recipe",
        choices=["independent", "joint", "both"],
        default="independent",
        help="train each candidate alone, a group of members together on their "
        "ensemble's loss, or both (selection picks among all)",
    )
    p.add_argument("--only", default="", help="comma-separated recipe names to train")
    p.add_argument(
        "--phase",
        choices=["all", "train", "select", "export"],
        default="all",
        help="train, select members on validation, export ONNX + manifest; "
        "all = the three in order",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--jobs", type=int, default=1, help="parallel training processes")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars (per-epoch log lines only)",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="the family folder to write (default: variants/families/NAME for a "
        "named dataset, families/NAME for an image folder)",
    )
    p.add_argument("--family-name", default="", help="the family's name (default: the data's)")
    p.add_argument(
        "--budget-ms",
        type=float,
        default=None,
        help="latency one member may take per image on the target device (batch 1, "
        "one thread): candidates over it are not trained or selected",
    )
    p.add_argument(
        "--device-profile",
        default="here",
        help="target device: here (this machine), rpi4 or rpi5 (estimated factors), "
        "or a profile file measured on the device (python -m variants.budget)",
    )
    p.add_argument("--latency-runs", type=int, default=1000, help="timed runs per model at export")
    p.add_argument("--min-members", type=int, default=5, help="smallest family to select")
    p.add_argument("--max-members", type=int, default=7, help="largest family to select")
    p.add_argument(
        "--min-macs-gain",
        type=float,
        default=None,
        help="each variant needs this many times fewer MACs than the reference "
        "(default: 5 for Fashion-MNIST, 4 otherwise)",
    )
    p.add_argument(
        "--min-cheapest-gain",
        type=float,
        default=None,
        help="the cheapest member needs this many times fewer MACs "
        "(default: 20 for Fashion-MNIST, 10 otherwise)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.jobs < 1 or args.decode_workers < 1:
        p.error("--jobs and --decode-workers must be >= 1")
    if args.budget_ms is not None and args.budget_ms <= 0:
        p.error("--budget-ms must be > 0")
    if not 1 <= args.min_members <= args.max_members:
        p.error("need 1 <= --min-members <= --max-members")
    try:
        return _run(args, p)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    named = args.data in datasets.NAMED
    name = args.data if named else Path(args.data).expanduser().resolve().name
    if args.run_dir is None:
        args.run_dir = DEFAULT_RUN_DIR if args.data == "fashion-mnist" else Path("runs") / name
    cache = args.cache_dir or args.run_dir / "cache"
    splits = datasets.load(
        args.data,
        None if named else cache,
        args.channels,
        args.input_size,
        progress=args.progress,
        workers=args.decode_workers,
    )
    args.data_flags = ["--data", args.data, "--cache-dir", str(cache)] + (
        []
        if named
        else ["--channels", str(splits.input.channels), "--input-size", str(splits.input.size)]
    )
    if args.out_dir is None:
        args.out_dir = FAMILIES_DIR / name if named else Path("families") / name
    log(
        "data.ready",
        name=splits.name,
        classes=splits.num_classes,
        input=list(splits.input.shape),
        train=len(splits.train),
        val=len(splits.val),
        test=len(splits.test),
    )
    plan = make_plan(args.plan, args.recipe, splits)
    if args.phase in ("all", "train"):
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        device = pick_device(args.device)
        todo = plan
        if args.only:
            names = set(args.only.split(","))
            unknown = names - {r.name for r in plan}
            if unknown:
                p.error(f"unknown recipe(s) {sorted(unknown)}; known: {[r.name for r in plan]}")
            todo = [r for r in plan if r.name in names]
        elif args.budget_ms is not None:
            todo = prune_to_budget(plan, args, splits)
        run_plan(todo, args, device, splits)
    if args.phase in ("all", "select", "export"):
        from variants import export

        try:
            export.select_and_export(
                args.run_dir,
                plan,
                args,
                splits,
                rules_for(args, splits),
                do_export=args.phase != "select",
            )
        except export.ExportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(json.dumps({"event": "train.done", "phase": args.phase}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
