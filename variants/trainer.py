"""Train one model to completion, checkpointing every epoch and resuming (needs PyTorch).

The training images stay on the device when they fit (``DEVICE_BYTES``); a larger set is
read from its cache file on disk batch by batch. The epoch's randomness derives from
(seed, epoch), so a resumed run repeats what the interrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from variants.datasets import ImageSet, Splits
from variants.plans import Recipe, recipe_from_dict

DEVICE_BYTES = 2 << 30  # a split larger than this is read from disk per batch ...
MEMORY_SHARE = 4  # ... and so is one larger than this fraction of the free memory


def _free_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def log(event: str, **fields: Any) -> None:
    fields = {"event": event, "time": round(time.time(), 3), **fields}
    print(json.dumps(fields), file=sys.stderr, flush=True)


def atomic_save(obj: Any, path: Path) -> None:
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


def input_format(splits: Splits) -> Any:
    from variants.models import InputFormat

    return InputFormat(splits.input.channels, splits.input.size, splits.mean, splits.std)


def build_model(recipe: Recipe, splits: Splits | None = None, fmt: Any = None) -> Any:
    """The member ``recipe`` describes, for the dataset's input and classes."""
    from variants.models import Arch, InputFormat, MobileNetV2

    if fmt is None:
        fmt = input_format(splits) if splits is not None else InputFormat()
    classes = splits.num_classes if splits is not None else 10
    return MobileNetV2(
        Arch(width=recipe.width, resolution=recipe.resolution, depth=recipe.depth), classes, fmt
    )


def model_from_final(final: dict[str, Any]) -> Any:
    """The trained model stored in a ``final.pt`` (older ones: Fashion-MNIST's input)."""
    from variants.models import Arch, InputFormat, MobileNetV2

    fmt_raw = final.get("format")
    fmt = (
        InputFormat(
            fmt_raw["channels"], fmt_raw["size"], tuple(fmt_raw["mean"]), tuple(fmt_raw["std"])
        )
        if fmt_raw
        else InputFormat()
    )
    recipe = recipe_from_dict(final["recipe"])
    arch = Arch(width=recipe.width, resolution=recipe.resolution, depth=recipe.depth)
    model = MobileNetV2(arch, int(final.get("num_classes", 10)), fmt)
    model.load_state_dict(final["model"])
    return model.eval()


def final_extras(splits: Splits) -> dict[str, Any]:
    """What a ``final.pt`` records beside the weights to rebuild its model alone."""
    return {
        "format": {
            "channels": splits.input.channels,
            "size": splits.input.size,
            "mean": list(splits.mean),
            "std": list(splits.std),
        },
        "num_classes": splits.num_classes,
        "dataset": splits.name,
    }


class DeviceImages:
    """A split's uint8 images for training: all on the device, or gathered per batch."""

    def __init__(self, images: Any, device: str, limit: int = 0) -> None:
        import torch

        self.device = device
        n = images.shape[0] if not limit else min(limit, images.shape[0])
        self.n = int(n)
        nbytes = images.nbytes * self.n / max(1, images.shape[0])
        if nbytes <= min(DEVICE_BYTES, _free_memory() // MEMORY_SHARE):
            self.whole: Any = torch.from_numpy(np.ascontiguousarray(images[: self.n])).to(device)
            self.disk = None
        else:
            self.whole, self.disk = None, images

    def take(self, idx: Any) -> Any:
        """uint8 images of these indices, on the device."""
        import torch

        if self.whole is not None:
            return self.whole[idx]
        rows = self.disk[idx.cpu().numpy()]  # type: ignore[index]
        return torch.from_numpy(np.ascontiguousarray(rows)).to(self.device)

    def batches(self, batch: int = 1000) -> Any:
        import torch

        for i in range(0, self.n, batch):
            yield self.take(torch.arange(i, min(self.n, i + batch), device=self.device))


def augment(x: Any, gen: Any, erase_p: float, hflip: bool = True) -> tuple[Any, Any]:
    """Flip, translate by up to 1/14 of the side, random erasing; batched on x's device.

    Returns the augmented batch and the flip mask (distillation picks the teacher's
    output for the flipped or plain image with it).
    """
    import torch
    import torch.nn.functional as F

    b, c, size = x.shape[0], x.shape[1], x.shape[-1]
    dev = x.device
    flip = torch.rand(b, device=dev, generator=gen) < 0.5
    if not hflip:
        flip = torch.zeros_like(flip)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = max(1, round(2 * size / 28))
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=gen)
    ar = torch.arange(size, device=dev)
    rows = (oy[:, None] + ar)[:, None, :, None]
    cols = (ox[:, None] + ar)[:, None, None, :]
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    x = xp[bi, ci, rows, cols]
    if erase_p > 0:
        area = size * size * (0.02 + 0.23 * torch.rand(b, device=dev, generator=gen))
        log_ratio = math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * torch.rand(
            b, device=dev, generator=gen
        )
        ratio = torch.exp(log_ratio)
        h = torch.sqrt(area * ratio).clamp(1, size - 1)
        w = torch.sqrt(area / ratio).clamp(1, size - 1)
        y0 = torch.rand(b, device=dev, generator=gen) * (size - h)
        x0 = torch.rand(b, device=dev, generator=gen) * (size - w)
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


def epoch_batches(
    images: Any,
    labels: Any,
    *,
    count: int,
    seed: int,
    epoch: int,
    batch: int,
    steps: int,
    erase_p: float,
    hflip: bool,
    device: str,
) -> Iterator[tuple[Any, Any, Any, Any]]:
    """One epoch's shuffled, augmented batches as (idx, x, y, flipped): the same for a given
    seed and epoch, so a resumed run sees the batches it would have seen."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 10_007 + epoch)
    perm = torch.randperm(count, device=device, generator=gen)
    for step in range(steps):
        idx = perm[step * batch : (step + 1) * batch]
        x, flip = augment(images.take(idx).float().div_(255), gen, erase_p, hflip)
        yield idx, x.contiguous(memory_format=torch.channels_last), labels[idx], flip


def autocast(device: str) -> Any:
    import torch

    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def evaluate_logits(model: Any, images: DeviceImages, device: str, flip: bool = False) -> Any:
    """Logits for every image of ``images``; no augmentation (optionally mirrored)."""
    import torch

    model.eval()
    outs = []
    with torch.no_grad(), autocast(device):
        for u8 in images.batches():
            x = u8.float().div_(255)
            if flip:
                x = x.flip(3)
            outs.append(model(x.contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(outs)


def param_groups(params: list[Any], weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: weight decay on weights, none on norms and biases."""
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def make_optimizer(params: list[Any], recipe: Recipe, device: str, total: int) -> Any:
    """SGD with Nesterov momentum, no decay on norms and biases, a one-cycle schedule."""
    import torch

    groups = param_groups(params, recipe.weight_decay)
    opt_kw: dict[str, Any] = {"lr": recipe.lr, "momentum": 0.9, "nesterov": True}
    if device == "cuda":
        opt_kw["fused"] = True
    opt = torch.optim.SGD(groups, **opt_kw)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=recipe.lr,
        total_steps=total,
        pct_start=0.15,
        div_factor=20,
        final_div_factor=200,
    )
    return opt, sched


def load_teacher(recipe: Recipe, run_dir: Path, device: str) -> tuple[Any, Any] | None:
    """The reference's stored logits (plain, flipped) for a distilled recipe."""
    import torch

    if not recipe.distill:
        return None
    tpath = run_dir / "teacher.pt"
    if not tpath.exists():
        raise SystemExit(
            f"error: {recipe.name} distills from {tpath}, which is missing; "
            "train the reference first (python -m variants.train)"
        )
    t = torch.load(tpath, map_location="cpu", weights_only=False)
    return t["plain"].to(device), t["flipped"].to(device)


def kd_loss(logits: Any, teacher_logits: Any, temperature: float) -> Any:
    import torch.nn.functional as F

    return (
        F.kl_div(
            F.log_softmax(logits / temperature, 1),
            F.log_softmax(teacher_logits / temperature, 1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature
        * temperature
    )


def teacher_rows(teacher: tuple[Any, Any] | None, idx: Any, flip: Any) -> Any:
    """The teacher's logits for a batch: of the flipped image where it was flipped."""
    import torch

    if teacher is None:
        return None
    return torch.where(flip[:, None], teacher[1][idx], teacher[0][idx])


def member_loss(logits: Any, y: Any, recipe: Recipe, teacher_logits: Any = None) -> Any:
    """A member's own loss: cross-entropy, mixed with distillation if it distills."""
    import torch.nn.functional as F

    loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
    if teacher_logits is not None and recipe.distill:
        kd = kd_loss(logits, teacher_logits, recipe.kd_temperature)
        loss = recipe.kd_alpha * kd + (1 - recipe.kd_alpha) * loss
    return loss


def same_recipe(stored: dict[str, Any], recipe: Recipe) -> bool:
    """Whether a checkpoint's recipe is this one (fields it predates at their defaults)."""
    return dataclasses.asdict(recipe_from_dict(stored)) == dataclasses.asdict(recipe)


def train_one(
    recipe: Recipe, run_dir: Path, device: str, progress: bool, splits: Splits
) -> dict[str, Any]:
    """Train one model to completion, resuming from its last checkpoint."""
    import torch

    out_dir = run_dir / recipe.name
    out_dir.mkdir(parents=True, exist_ok=True)
    final_path = out_dir / "final.pt"
    if final_path.exists():
        final = torch.load(final_path, map_location="cpu", weights_only=False)
        log("train.skip_finished", model=recipe.name, val_accuracy=final["val_accuracy"])
        return dict(final)

    torch.manual_seed(recipe.seed)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    images = DeviceImages(splits.train.images, device, recipe.train_limit)
    labels = torch.from_numpy(np.asarray(splits.train.labels[: images.n])).to(device)
    val_images = DeviceImages(splits.val.images, device)
    val_labels = torch.from_numpy(np.asarray(splits.val.labels)).to(device)
    teacher = load_teacher(recipe, run_dir, device)

    model = build_model(recipe, splits).to(device).to(memory_format=torch.channels_last)
    n = images.n
    steps_per_epoch = max(1, n // recipe.batch)
    total = steps_per_epoch * recipe.epochs
    opt, sched = make_optimizer(list(model.parameters()), recipe, device, total)
    start_epoch = 0
    history: list[dict[str, Any]] = []
    ckpt_path = out_dir / "ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if not same_recipe(ck["recipe"], recipe):
            raise SystemExit(
                f"error: {ckpt_path} was made with another recipe; move it away "
                "or use another --run-dir"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start_epoch, history = ck["epoch"], ck["history"]
        log("train.resume", model=recipe.name, epoch=start_epoch)

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
        t0 = time.monotonic()
        loss_sum = torch.zeros((), device=device)
        for idx, x, y, flip in epoch_batches(
            images,
            labels,
            count=n,
            seed=recipe.seed,
            epoch=epoch,
            batch=recipe.batch,
            steps=steps_per_epoch,
            erase_p=recipe.erase_p,
            hflip=splits.hflip,
            device=device,
        ):
            with autocast(device):
                logits = model(x).float()
            loss = member_loss(logits, y, recipe, teacher_rows(teacher, idx, flip))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            if bar is not None:
                bar.update(1)
        val_logits = evaluate_logits(model, val_images, device)
        val_acc = float((val_logits.argmax(1) == val_labels).float().mean())
        done = epoch + 1 - start_epoch
        eta = (time.monotonic() - t_start) / done * (recipe.epochs - epoch - 1)
        rec = {
            "epoch": epoch + 1,
            "loss": float(loss_sum) / steps_per_epoch,
            "val_accuracy": round(val_acc, 5),
            "seconds": round(time.monotonic() - t0, 2),
        }
        history.append(rec)
        log("train.epoch", model=recipe.name, epochs=recipe.epochs, eta_s=round(eta, 1), **rec)
        atomic_save(
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
    val_logits = evaluate_logits(model, val_images, device)
    val_acc = float((val_logits.argmax(1) == val_labels).float().mean())
    final = {
        "recipe": dataclasses.asdict(recipe),
        "val_accuracy": val_acc,
        "history": history,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "device": device,
        **final_extras(splits),
    }
    atomic_save(final, final_path)
    log("train.finished", model=recipe.name, val_accuracy=round(val_acc, 5))
    return final


def store_teacher(run_dir: Path, device: str, splits: Splits, limit: int = 0) -> None:
    """The reference's logits on the training images (the first ``limit``), plain and flipped."""
    import torch

    path = run_dir / "teacher.pt"
    if path.exists():
        return
    final = torch.load(run_dir / "reference" / "final.pt", map_location="cpu", weights_only=False)
    model = model_from_final(final).to(device).to(memory_format=torch.channels_last)
    imgs = DeviceImages(splits.train.images, device, limit)
    plain = evaluate_logits(model, imgs, device).cpu()
    flipped = evaluate_logits(model, imgs, device, flip=True).cpu()
    atomic_save({"plain": plain, "flipped": flipped}, path)
    log("teacher.stored", images=int(plain.shape[0]))


__all__ = ["ImageSet", "build_model", "store_teacher", "train_one"]
