"""Train the reference and the variant family, then select, export and write the manifest.

    python -m variants.train                      # the whole family, resumable
    python -m variants.train --device cuda --jobs 12
    python -m variants.train --phase export       # export what is trained, write the manifest

Every model checkpoints after each epoch into ``RUN_DIR/NAME/ckpt.pt`` and resumes from
there when the command is started again; a finished model is ``RUN_DIR/NAME/final.pt``.
Phases: the reference and the plain candidates train first; the reference's logits on the
training images (plain and flipped) are then stored, and the distilled candidates learn
from them (storing the teacher's outputs instead of running it per batch makes distillation
as cheap as plain training on a CPU). Members are selected on the validation split only;
the held-out test set is evaluated after selection, for the record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from variants import data

DEFAULT_RUN_DIR = Path("runs/family")


@dataclass(frozen=True)
class Recipe:
    """Everything that defines how one model is trained."""

    name: str
    width: float
    resolution: int
    depth: float = 1.0
    epochs: int = 40
    lr: float = 0.2
    weight_decay: float = 5e-5
    batch: int = 256
    seed: int = 0
    label_smoothing: float = 0.0
    erase_p: float = 0.5
    distill: bool = False
    kd_alpha: float = 0.7
    kd_temperature: float = 3.0
    train_limit: int = 0  # >0: train on that many images only (smoke runs)

    @property
    def role(self) -> str:
        return "reference" if self.name == "reference" else "variant"


def _candidate(
    width: float, res: int, seed: int, distill: bool, depth: float = 1.0, **kw: Any
) -> Recipe:
    shape = f"w{round(width * 100):03d}-r{res}" + (
        "" if depth == 1.0 else f"-d{round(depth * 100)}"
    )
    name = f"{shape}-s{seed}" + ("-kd" if distill else "")
    return Recipe(
        name=name, width=width, resolution=res, depth=depth, seed=seed, distill=distill, **kw
    )


def default_plan() -> list[Recipe]:
    """The reference and a pool of candidate variants; selection picks the family from it.

    Width 0.25 at several input resolutions follows the paper's seed table; a few wider,
    lower-resolution candidates and plain (undistilled) twins let selection measure what
    distillation and width buy.
    """
    plan = [
        Recipe(
            "reference",
            width=1.0,
            resolution=28,
            epochs=40,
            lr=0.2,
            weight_decay=1e-4,
            label_smoothing=0.1,
            seed=0,
        )
    ]
    plan += [
        _candidate(w, r, s, False)
        for w, r, s in [(0.25, 28, 11), (0.25, 20, 12), (0.25, 14, 13), (0.5, 16, 14)]
    ]
    plan += [
        _candidate(w, r, s, True)
        for w, r, s in [
            (0.25, 28, 1),
            (0.25, 24, 2),
            (0.25, 20, 3),
            (0.25, 16, 4),
            (0.25, 14, 5),
            (0.25, 12, 6),
            (0.35, 24, 7),
            (0.35, 18, 8),
            (0.5, 16, 9),
            (0.5, 14, 10),
        ]
    ]
    # Half-depth twins of the cheapest: at 14-16 px, per-layer overhead, not MACs, sets
    # the latency, so fewer layers buy the 10x latency target that width alone misses.
    plan += [_candidate(0.25, r, s, True, depth=0.5) for r, s in [(14, 15), (16, 16)]]
    # ... and plain twins of those: on validation, a plain cheapest member complemented
    # the rest of the family slightly better than a distilled one.
    plan += [_candidate(0.25, r, s, False, depth=0.5) for r, s in [(14, 17), (16, 18)]]
    return plan


def smoke_plan() -> list[Recipe]:
    """A minutes-long plan that runs every phase end to end (for tests and CI)."""
    tiny = {"epochs": 1, "batch": 64, "train_limit": 256, "lr": 0.05}
    return [
        Recipe("reference", width=1.0, resolution=28, seed=0, **tiny),  # type: ignore[arg-type]
        _candidate(0.25, 14, 1, False, **tiny),
        _candidate(0.25, 12, 2, True, **tiny),
    ]


PLANS = {"default": default_plan, "smoke": smoke_plan}


# --------------------------------------------------------------------------- training


def _log(event: str, **fields: Any) -> None:
    fields = {"event": event, "time": round(time.time(), 3), **fields}
    print(json.dumps(fields), file=sys.stderr, flush=True)


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: --device cuda asked for, but torch sees no CUDA device; "
            "use --device cpu or auto"
        )
    return name


def _augment(x: Any, gen: Any, erase_p: float) -> tuple[Any, Any]:
    """Flip, translate by up to 2 pixels, random erasing; all batched on x's device.

    Returns the augmented batch and the flip mask (distillation picks the teacher's
    output for the flipped or plain image with it).
    """
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    dev = x.device
    flip = torch.rand(b, device=dev, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = 2
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=gen)
    ar = torch.arange(28, device=dev)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    x = xp[torch.arange(b, device=dev)[:, None, None], 0, rows, cols].unsqueeze(1)
    if erase_p > 0:
        area = 28 * 28 * (0.02 + 0.23 * torch.rand(b, device=dev, generator=gen))
        log_ratio = math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * torch.rand(
            b, device=dev, generator=gen
        )
        ratio = torch.exp(log_ratio)
        h = torch.sqrt(area * ratio).clamp(1, 27)
        w = torch.sqrt(area / ratio).clamp(1, 27)
        y0 = torch.rand(b, device=dev, generator=gen) * (28 - h)
        x0 = torch.rand(b, device=dev, generator=gen) * (28 - w)
        on = torch.rand(b, device=dev, generator=gen) < erase_p
        inside = (
            (ar[None, :, None] >= y0[:, None, None])
            & (ar[None, :, None] < (y0 + h)[:, None, None])
            & (ar[None, None, :] >= x0[:, None, None])
            & (ar[None, None, :] < (x0 + w)[:, None, None])
            & on[:, None, None]
        )
        noise = torch.rand(x.shape, device=dev, generator=gen)
        x = torch.where(inside[:, None], noise, x)
    return x, flip


def evaluate_logits(model: Any, images: Any, device: str, batch: int = 1000) -> Any:
    """Logits for uint8 images (N, 28, 28) already on ``device``; no augmentation."""
    import torch

    model.eval()
    outs = []
    with torch.no_grad(), _autocast(device):
        for i in range(0, images.shape[0], batch):
            x = images[i : i + batch].float().div_(255).unsqueeze(1)
            x = x.contiguous(memory_format=torch.channels_last)
            outs.append(model(x).float())
    return torch.cat(outs)


def _autocast(device: str) -> Any:
    import torch

    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def build_model(recipe: Recipe) -> Any:
    from variants.models import Arch, MobileNetV2

    return MobileNetV2(Arch(width=recipe.width, resolution=recipe.resolution, depth=recipe.depth))


def train_one(recipe: Recipe, run_dir: Path, device: str, progress: bool) -> dict[str, Any]:
    """Train one model to completion, resuming from its last checkpoint."""
    import torch
    import torch.nn.functional as F

    out_dir = run_dir / recipe.name
    out_dir.mkdir(parents=True, exist_ok=True)
    final_path = out_dir / "final.pt"
    if final_path.exists():
        final = torch.load(final_path, map_location="cpu", weights_only=False)
        _log("train.skip_finished", model=recipe.name, val_accuracy=final["val_accuracy"])
        return dict(final)

    torch.manual_seed(recipe.seed)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    train_split, val_split = data.split_train_val(data.load_split("train"))
    images = torch.from_numpy(np.ascontiguousarray(train_split.images)).to(device)
    labels = torch.from_numpy(train_split.labels).to(device)
    if recipe.train_limit:
        images, labels = images[: recipe.train_limit], labels[: recipe.train_limit]
    val_images = torch.from_numpy(np.ascontiguousarray(val_split.images)).to(device)
    val_labels = torch.from_numpy(val_split.labels).to(device)
    teacher = None
    if recipe.distill:
        tpath = run_dir / "teacher.pt"
        if not tpath.exists():
            raise SystemExit(
                f"error: {recipe.name} distills from {tpath}, which is missing; "
                "train the reference first (python -m variants.train)"
            )
        t = torch.load(tpath, map_location="cpu", weights_only=False)
        teacher = (t["plain"].to(device), t["flipped"].to(device))

    model = build_model(recipe).to(device).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt_kw: dict[str, Any] = {"lr": recipe.lr, "momentum": 0.9, "nesterov": True}
    if device == "cuda":
        opt_kw["fused"] = True
    opt = torch.optim.SGD(groups, **opt_kw)
    n = images.shape[0]
    steps_per_epoch = max(1, n // recipe.batch)
    total = steps_per_epoch * recipe.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=recipe.lr,
        total_steps=total,
        pct_start=0.15,
        div_factor=20,
        final_div_factor=200,
    )
    start_epoch = 0
    history: list[dict[str, Any]] = []
    ckpt_path = out_dir / "ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck["recipe"] != dataclasses.asdict(recipe):
            raise SystemExit(
                f"error: {ckpt_path} was made with another recipe; move it away "
                "or use another --run-dir"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start_epoch, history = ck["epoch"], ck["history"]
        _log("train.resume", model=recipe.name, epoch=start_epoch)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=total,
            initial=start_epoch * steps_per_epoch,
            desc=recipe.name,
            unit="step",
            dynamic_ncols=True,
        )
    t_start = time.monotonic()
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        # The epoch's randomness derives from (seed, epoch): a resumed run repeats it.
        gen = torch.Generator(device=device)
        gen.manual_seed(recipe.seed * 10_007 + epoch)
        perm = torch.randperm(n, device=device, generator=gen)
        t0 = time.monotonic()
        loss_sum = torch.zeros((), device=device)
        for step in range(steps_per_epoch):
            idx = perm[step * recipe.batch : (step + 1) * recipe.batch]
            x = images[idx].float().div_(255).unsqueeze(1)
            x, flip = _augment(x, gen, recipe.erase_p)
            x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            with _autocast(device):
                logits = model(x).float()
            loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
            if teacher is not None:
                tl = torch.where(flip[:, None], teacher[1][idx], teacher[0][idx])
                temp = recipe.kd_temperature
                kd = (
                    F.kl_div(
                        F.log_softmax(logits / temp, 1),
                        F.log_softmax(tl / temp, 1),
                        reduction="batchmean",
                        log_target=True,
                    )
                    * temp
                    * temp
                )
                loss = recipe.kd_alpha * kd + (1 - recipe.kd_alpha) * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            if bar is not None:
                bar.update(1)
        val_logits = evaluate_logits(model, val_images, device)
        val_acc = float((val_logits.argmax(1) == val_labels).float().mean())
        secs = time.monotonic() - t0
        done = epoch + 1 - start_epoch
        eta = (time.monotonic() - t_start) / done * (recipe.epochs - epoch - 1)
        rec = {
            "epoch": epoch + 1,
            "loss": float(loss_sum) / steps_per_epoch,
            "val_accuracy": round(val_acc, 5),
            "seconds": round(secs, 2),
        }
        history.append(rec)
        _log("train.epoch", model=recipe.name, epochs=recipe.epochs, eta_s=round(eta, 1), **rec)
        _atomic_save(
            {
                "recipe": dataclasses.asdict(recipe),
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "history": history,
            },
            ckpt_path,
        )
    if bar is not None:
        bar.close()
    model.eval()
    val_logits = evaluate_logits(model, val_images, device)
    val_acc = float((val_logits.argmax(1) == val_labels).float().mean())
    final = {
        "recipe": dataclasses.asdict(recipe),
        "val_accuracy": val_acc,
        "history": history,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "device": device,
    }
    _atomic_save(final, final_path)
    _log("train.finished", model=recipe.name, val_accuracy=round(val_acc, 5))
    return final


def store_teacher(run_dir: Path, device: str, limit: int = 0) -> None:
    """The reference's logits on the training images (the first ``limit``), plain and flipped."""
    import torch

    path = run_dir / "teacher.pt"
    if path.exists():
        return
    final = torch.load(run_dir / "reference" / "final.pt", map_location="cpu", weights_only=False)
    model = build_model(Recipe(**final["recipe"])).to(device)
    model.load_state_dict(final["model"])
    model = model.to(memory_format=torch.channels_last)
    train_split, _ = data.split_train_val(data.load_split("train"))
    imgs = torch.from_numpy(np.ascontiguousarray(train_split.images)).to(device)
    if limit:
        imgs = imgs[:limit]
    plain = evaluate_logits(model, imgs, device).cpu()
    flipped = evaluate_logits(model, imgs.flip(2), device).cpu()
    _atomic_save({"plain": plain, "flipped": flipped}, path)
    _log("teacher.stored", images=int(plain.shape[0]))


# --------------------------------------------------------------------------- scheduling


def run_plan(plan: list[Recipe], args: argparse.Namespace, device: str) -> None:
    """Train every recipe of the plan; with --jobs > 1, as parallel worker processes."""
    run_dir: Path = args.run_dir
    pending = [r for r in plan if not (run_dir / r.name / "final.pt").exists()]
    teacher_ready = (run_dir / "teacher.pt").exists()
    limits = [r.train_limit for r in plan if r.distill]
    teacher_limit = 0 if not limits or 0 in limits else max(limits)
    if args.jobs <= 1:
        for r in sorted(pending, key=lambda r: (r.distill, r.role != "reference")):
            if r.distill and not teacher_ready:
                store_teacher(run_dir, device, teacher_limit)
                teacher_ready = True
            train_one(r, run_dir, device, progress=args.progress)
        return

    running: dict[str, subprocess.Popen[bytes]] = {}
    failed: list[str] = []
    while pending or running:
        for name, proc in list(running.items()):
            rc = proc.poll()
            if rc is not None:
                del running[name]
                if rc != 0:
                    failed.append(name)
                    _log("train.worker_failed", model=name, returncode=rc)
        if not teacher_ready and (run_dir / "reference" / "final.pt").exists():
            store_teacher(run_dir, device, teacher_limit)
            teacher_ready = True
        ready = [r for r in pending if not r.distill or teacher_ready]
        if "reference" in failed:
            pending = [r for r in pending if not r.distill]
        while ready and len(running) < args.jobs:
            r = ready.pop(0)
            pending.remove(r)
            cmd = [
                sys.executable,
                "-m",
                "variants.train",
                "--run-dir",
                str(run_dir),
                "--plan",
                args.plan,
                "--device",
                device,
                "--only",
                r.name,
                "--phase",
                "train",
                "--jobs",
                "1",
                "--threads",
                "1",
                "--no-progress",
            ]
            running[r.name] = subprocess.Popen(cmd)
            _log("train.worker_started", model=r.name)
        time.sleep(0.5)
    if failed:
        raise SystemExit(f"error: training failed for {', '.join(failed)}; see the log above")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m variants.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        default=DEFAULT_RUN_DIR,
        help="where checkpoints live (default: %(default)s)",
    )
    p.add_argument(
        "--plan",
        choices=sorted(PLANS),
        default="default",
        help="which recipes to train (smoke: a minutes-long end-to-end check)",
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
        help="no progress bar (per-epoch log lines only)",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where ONNX files and manifest.json go (default: the variants package)",
    )
    p.add_argument("--min-members", type=int, default=5, help="smallest family to select")
    p.add_argument("--max-members", type=int, default=7, help="largest family to select")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.phase in ("all", "train"):
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        device = pick_device(args.device)
        plan = PLANS[args.plan]()
        if args.only:
            names = set(args.only.split(","))
            unknown = names - {r.name for r in plan}
            if unknown:
                p.error(f"unknown recipe(s) {sorted(unknown)}; known: {[r.name for r in plan]}")
            plan = [r for r in plan if r.name in names]
        try:
            run_plan(plan, args, device)
        except data.DatasetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.phase in ("all", "select", "export"):
        from variants import export

        try:
            export.select_and_export(
                args.run_dir, PLANS[args.plan](), args, do_export=args.phase != "select"
            )
        except (data.DatasetError, export.ExportError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
