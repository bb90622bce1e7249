"""``python -m variants.sensai``: train, select and export the class-parallel baseline.

sensAI (Wang et al., MLSys 2021) serves a classifier as one pruned sub-model per group of
classes; the answer is the class of the most confident group. This command builds such
sub-models from the shipped reference for several groupings (one-vs-rest, 5 groups of 2,
2 groups of 5): prune (``variants.prune``), refit the head on pooled features, then
fine-tune the whole sub-model on the training split (hard labels and the reference's own
probabilities, collapsed to the group plus "other"), select the epoch on the validation
split, export ONNX (weights stored as float16, computed in float32), and write
``variants/subnets/manifest.json`` with each sub-model's accuracy, params, MACs and latency
beside the reference's. The t10k test set is scored after selection, for the record.

Each sub-model checkpoints after every epoch under ``--run-dir``; running the command
again resumes, and a larger ``--epochs`` trains on from there (``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from variants import MANIFEST_PATH, PACKAGE_DIR, data

SUBNETS_DIR = PACKAGE_DIR / "subnets"
HEAD_STEPS = 300


@dataclass(frozen=True)
class Grouping:
    """A partition of the ten classes and the channel fraction each sub-model keeps."""

    name: str
    groups: tuple[tuple[int, ...], ...]
    keep: float

    def __post_init__(self) -> None:
        flat = sorted(c for g in self.groups for c in g)
        if flat != list(range(10)):
            raise ValueError(f"grouping {self.name}: groups {self.groups} must cover 0..9 once")

    def member(self, i: int) -> str:
        return f"{self.name}-g{i}"


# Fewer classes per group, fewer channels: sensAI prunes a sub-model to what its group
# needs. Groups of similar classes (tops, shoes) share a sub-model.
GROUPINGS: tuple[Grouping, ...] = (
    Grouping("g2x5", ((0, 2, 3, 4, 6), (1, 5, 7, 8, 9)), keep=0.35),
    Grouping("g5x2", ((0, 6), (2, 4), (1, 3), (5, 7), (8, 9)), keep=0.25),
    Grouping("g10x1", tuple((c,) for c in range(10)), keep=0.2),
)


def _log(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}), file=sys.stderr)


def reference_path() -> Path:
    manifest = json.loads(MANIFEST_PATH.read_text())
    ref = next((m for m in manifest["models"] if m.get("role") == "reference"), None)
    if ref is None:
        raise SystemExit(f"error: {MANIFEST_PATH} names no model with role 'reference'")
    return MANIFEST_PATH.parent / ref["file"]


def group_targets(probs: np.ndarray, group: tuple[int, ...]) -> np.ndarray:
    """Ten-class probabilities collapsed to the group's classes plus "other"."""
    rest = [c for c in range(10) if c not in group]
    return np.concatenate([probs[:, list(group)], probs[:, rest].sum(1, keepdims=True)], 1)


def group_labels(labels: np.ndarray, group: tuple[int, ...]) -> np.ndarray:
    out = np.full(len(labels), len(group), dtype=np.int64)
    for i, c in enumerate(group):
        out[labels == c] = i
    return out


def combine(outputs: list[np.ndarray], groups: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """Class scores (N, 10) from each group's sub-model output (N, g + 1): a class scores
    its own group's probability for it; the answer is the argmax (most confident group)."""
    scores = np.full((outputs[0].shape[0], 10), -1.0, dtype=np.float32)
    for out, group in zip(outputs, groups, strict=True):
        scores[:, list(group)] = out[:, : len(group)]
    return scores


def _teacher(run_dir: Path, ref: Path, images: np.ndarray) -> np.ndarray:
    from variants import runtime

    path = run_dir / "teacher-train.npy"
    if path.exists():
        probs = np.load(path)
        if probs.shape == (len(images), 10):
            return np.asarray(probs)
    _log("sensai_teacher", images=len(images))
    probs = runtime.session(ref, threads=1)
    out = np.concatenate(
        [
            probs.run(None, {"input": (images[i : i + 500].astype(np.float32) / 255)[:, None]})[0]
            for i in range(0, len(images), 500)
        ]
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def _accuracy(model: Any, images: np.ndarray, labels: np.ndarray, device: str) -> float:
    return float((_probs(model, images, device).argmax(1) == labels).mean())


def _probs(model: Any, images: np.ndarray, device: str) -> np.ndarray:
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), 500):
            x = torch.from_numpy(images[i : i + 500].astype(np.float32) / 255)[:, None]
            outs.append(torch.softmax(model(x.to(device)), 1).cpu().numpy())
    return np.concatenate(outs)


def _loss(logits: Any, soft: Any, hard: Any) -> Any:
    """Half cross-entropy on the label, half on the reference's collapsed probabilities."""
    import torch.nn.functional as F

    return (
        0.5 * F.cross_entropy(logits, hard) - 0.5 * (soft * F.log_softmax(logits, 1)).sum(1).mean()
    )


def fit_head(model: Any, images: np.ndarray, soft: Any, hard: Any, device: str) -> None:
    """Refit the pruned model's linear head on its pooled features (forward passes only,
    then full-batch steps on the head): the cheap half of recovering from the cut."""
    import torch

    model.eval()
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), 500):
            x = torch.from_numpy(images[i : i + 500].astype(np.float32) / 255)[:, None]
            h = model.features(model.pre(x.to(device)))
            feats.append(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))
    f = torch.cat(feats)
    head = model.classifier[1]
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    soft, hard = soft.to(device), hard.to(device)
    for _ in range(HEAD_STEPS):
        loss = _loss(head(f), soft, hard)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train_member(
    grouping: Grouping,
    index: int,
    args: argparse.Namespace,
    splits: tuple[data.Split, data.Split, np.ndarray],
) -> Any:
    """Prune, fine-tune and select one sub-model; resumes from its checkpoint."""
    import torch

    from variants.prune import (
        channel_stats,
        prune,
        reference_from_onnx,
        shape_only_stats,
        with_reference_statistics,
    )

    train, val, teacher = splits
    group = grouping.groups[index]
    name = grouping.member(index)
    ckpt = args.run_dir / f"{name}.pt"
    rng = np.random.default_rng(args.seed + 1000 * index + len(grouping.groups))
    every = torch.from_numpy(train.as_float()[rng.choice(len(train), 512, replace=False)])
    ref = reference_from_onnx(reference_path())
    if ckpt.exists():  # the weights come from the checkpoint: build the shape only
        model = prune(ref, shape_only_stats(ref), grouping.keep, group, None)
    else:
        ref = with_reference_statistics(ref, every)
        in_group = np.flatnonzero(np.isin(train.labels, group))
        mine = torch.from_numpy(train.as_float()[rng.choice(in_group, 300, replace=False)])
        stats = channel_stats(ref, mine, every[:300])
        model = prune(ref, stats, grouping.keep, group, every)
    model = model.to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-5)
    state: dict[str, Any] = {"epoch": 0, "best_val": -1.0, "best_epoch": 0, "best": None}
    # The epoch is chosen on part of the validation split (all of it is scored at export).
    sel = val.images[: args.select_images]
    val_y = group_labels(val.labels[: args.select_images], group)
    if ckpt.exists():
        saved = torch.load(ckpt, map_location=args.device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
    targets = torch.from_numpy(group_targets(teacher, group)).float()
    hard = torch.from_numpy(group_labels(train.labels, group))
    if state["best"] is None:  # epoch 0: pruned, head refitted, a candidate too
        head_idx = rng.choice(len(train), args.head_images, replace=False)
        fit_head(model, train.images[head_idx], targets[head_idx], hard[head_idx], args.device)
        state["best_val"] = _accuracy(model, sel, val_y, args.device)
        state["best"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        _log("sensai_pruned", member=name, val_accuracy=round(state["best_val"], 5))
    steps_per_epoch = math.ceil(args.images_per_epoch / args.batch)
    total = steps_per_epoch * args.epochs
    while state["epoch"] < args.epochs:
        epoch = state["epoch"]
        started = time.time()
        model.train()
        order = np.random.default_rng(args.seed + epoch + 7 * index).permutation(len(train))
        order = order[: args.images_per_epoch]
        for step in range(steps_per_epoch):
            lr = 0.5 * args.lr * (1 + math.cos(math.pi * (epoch * steps_per_epoch + step) / total))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = order[step * args.batch : (step + 1) * args.batch]
            x = torch.from_numpy(train.images[idx].astype(np.float32) / 255)[:, None]
            flip = torch.rand(len(idx)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x).to(args.device)
            logits = model(x)
            loss = _loss(logits, targets[idx].to(args.device), hard[idx].to(args.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = _accuracy(model, sel, val_y, args.device)
        state["epoch"] = epoch + 1
        if acc > state["best_val"]:
            state["best_val"], state["best_epoch"] = acc, epoch + 1
            state["best"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        _log(
            "sensai_epoch",
            member=name,
            epoch=epoch + 1,
            val_accuracy=round(acc, 5),
            loss=round(float(loss.detach()), 4),
            seconds=round(time.time() - started, 1),
        )
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, tmp)
        os.replace(tmp, ckpt)
    model.load_state_dict(state["best"])
    model.best_val = state["best_val"]  # type: ignore[attr-defined]
    model.best_epoch = state["best_epoch"]  # type: ignore[attr-defined]
    return model.cpu().eval()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m variants.sensai", description=__doc__.split("\n")[0]
    )
    p.add_argument("--groupings", default=",".join(g.name for g in GROUPINGS))
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per sub-model")
    p.add_argument("--images-per-epoch", type=int, default=3_000, help="training images per epoch")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--head-images", type=int, default=3000, help="training images the head is refit on"
    )
    p.add_argument(
        "--select-images", type=int, default=2000, help="validation images that pick the epoch"
    )
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--run-dir", type=Path, default=Path("runs/sensai"))
    p.add_argument("--out", type=Path, default=SUBNETS_DIR)
    p.add_argument("--latency-runs", type=int, default=500)
    return p


def main(argv: list[str] | None = None) -> int:
    import torch

    from variants.subnets_export import export_grouping, write_manifest
    from variants.trainer import pick_device

    args = build_parser().parse_args(argv)
    args.device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    chosen = args.groupings.split(",")
    known = {g.name: g for g in GROUPINGS}
    bad = [n for n in chosen if n not in known]
    if bad or args.epochs < 0 or args.images_per_epoch < args.batch:
        sys.stderr.write(
            f"error: unknown groupings {bad} (known: {sorted(known)}) or epochs < 0 or "
            f"--images-per-epoch below --batch\n"
        )
        return 2
    args.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        train, val = data.split_train_val(data.load_split("train"))
        test = data.load_split("test")
    except data.DatasetError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    teacher = _teacher(args.run_dir, reference_path(), train.images)
    entries = []
    for name in chosen:
        grouping = known[name]
        models = [
            train_member(grouping, i, args, (train, val, teacher))
            for i in range(len(grouping.groups))
        ]
        entries.append(export_grouping(grouping, models, args.out, val, test))
        write_manifest(args.out, entries, reference_path(), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
