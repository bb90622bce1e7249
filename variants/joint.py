"""The joint recipe: a group of members trained together on one loss (needs PyTorch).

The paper trains its variants together. Each step feeds every member the same augmented
batch; the loss mixes each member's own loss (cross-entropy, plus distillation from the
reference's stored logits) with the loss of the ensemble's prediction, the members'
averaged softmax (what the swarm's vote sums):

    loss = (1 - beta) * mean_i loss_i + beta * NLL(log mean_i softmax_i)

The ensemble term rewards a member for fixing what the others get wrong, so the members
learn to complement each other. The group checkpoints every epoch and resumes; at the
end every member is written as its own ``final.pt``, so selection treats the jointly
trained members like any other candidates (on validation only).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from variants.datasets import Splits
from variants.plans import Recipe
from variants.trainer import (
    DeviceImages,
    atomic_save,
    autocast,
    build_model,
    epoch_batches,
    evaluate_logits,
    final_extras,
    load_teacher,
    log,
    make_optimizer,
    member_loss,
    same_recipe,
    teacher_rows,
)


def joint_loss(
    logits: list[Any], y: Any, recipes: list[Recipe], teacher_logits: Any, beta: float
) -> Any:
    """(1 - beta) * mean of the members' own losses + beta * NLL of their mean softmax."""
    import torch
    import torch.nn.functional as F

    own = sum(member_loss(z, y, r, teacher_logits) for z, r in zip(logits, recipes, strict=True))
    # log of the members' mean probability, computed stably in log space
    log_probs = torch.stack([F.log_softmax(z, 1) for z in logits])
    ens = torch.logsumexp(log_probs, 0) - math.log(len(logits))
    return (1 - beta) * own / len(logits) + beta * F.nll_loss(ens, y)


def train_joint(
    group: list[Recipe], run_dir: Path, device: str, progress: bool, splits: Splits
) -> None:
    """Train the members of ``group`` together to completion, resuming if interrupted."""
    import torch

    if not group:
        return
    lead = group[0]
    if all((run_dir / r.name / "final.pt").exists() for r in group):
        log("joint.skip_finished", members=[r.name for r in group])
        return
    out_dir = run_dir / f"{lead.joint}-group"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(lead.seed)
    images = DeviceImages(splits.train.images, device, lead.train_limit)
    labels = torch.from_numpy(np.asarray(splits.train.labels[: images.n])).to(device)
    val_images = DeviceImages(splits.val.images, device)
    val_labels = torch.from_numpy(np.asarray(splits.val.labels)).to(device)
    teacher = load_teacher(lead, run_dir, device)
    models = [
        build_model(r, splits).to(device).to(memory_format=torch.channels_last) for r in group
    ]
    params = [p for m in models for p in m.parameters()]
    n = images.n
    steps_per_epoch = max(1, n // lead.batch)
    total = steps_per_epoch * lead.epochs
    opt, sched = make_optimizer(params, lead, device, total)
    start_epoch, history = 0, []
    ckpt_path = out_dir / "ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if len(ck["recipes"]) != len(group) or not all(
            same_recipe(s, r) for s, r in zip(ck["recipes"], group, strict=True)
        ):
            raise SystemExit(
                f"error: {ckpt_path} was made with another joint group; move it away "
                "or use another --run-dir"
            )
        for m, state in zip(models, ck["models"], strict=True):
            m.load_state_dict(state)
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start_epoch, history = ck["epoch"], ck["history"]
        log("joint.resume", group=lead.joint, epoch=start_epoch)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc=lead.joint, unit="step")
    beta = lead.joint_beta
    t_start = time.monotonic()
    for epoch in range(start_epoch, lead.epochs):
        for m in models:
            m.train()
        t0 = time.monotonic()
        loss_sum = torch.zeros((), device=device)
        for idx, x, y, flip in epoch_batches(
            images,
            labels,
            count=n,
            seed=lead.seed,
            epoch=epoch,
            batch=lead.batch,
            steps=steps_per_epoch,
            erase_p=lead.erase_p,
            hflip=splits.hflip,
            device=device,
        ):
            tl = teacher_rows(teacher, idx, flip)
            with autocast(device):
                logits = [m(x).float() for m in models]
            loss = joint_loss(logits, y, group, tl, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            if bar is not None:
                bar.update(1)
        accs = [
            float((evaluate_logits(m, val_images, device).argmax(1) == val_labels).float().mean())
            for m in models
        ]
        done = epoch + 1 - start_epoch
        eta = (time.monotonic() - t_start) / done * (lead.epochs - epoch - 1)
        rec = {
            "epoch": epoch + 1,
            "loss": float(loss_sum) / steps_per_epoch,
            "val_accuracy": [round(a, 5) for a in accs],
            "seconds": round(time.monotonic() - t0, 2),
        }
        history.append(rec)
        log("joint.epoch", group=lead.joint, epochs=lead.epochs, eta_s=round(eta, 1), **rec)
        atomic_save(
            {
                "recipes": [dataclasses.asdict(r) for r in group],
                "epoch": epoch + 1,
                "models": [m.state_dict() for m in models],
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "history": history,
            },
            ckpt_path,
        )
    if bar is not None:
        bar.close()
    for m, r in zip(models, group, strict=True):
        val_acc = float(
            (evaluate_logits(m, val_images, device).argmax(1) == val_labels).float().mean()
        )
        (run_dir / r.name).mkdir(parents=True, exist_ok=True)
        atomic_save(
            {
                "recipe": dataclasses.asdict(r),
                "val_accuracy": val_acc,
                "history": history,
                "model": {k: v.detach().cpu() for k, v in m.state_dict().items()},
                "device": device,
                **final_extras(splits),
            },
            run_dir / r.name / "final.pt",
        )
        log("joint.finished", model=r.name, val_accuracy=round(val_acc, 5))
