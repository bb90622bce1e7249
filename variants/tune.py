"""Jointly fine-tune a family's variants, warm-started from its ONNX files (needs PyTorch).

    python -m variants.tune --family variants/families/fashion-mnist --epochs 8 \\
        --run-dir runs/tune --out-dir out/fashion-tuned
    python -m variants.tune --family ... --time-steps 5     # seconds per step, then exit

Every variant of the family is rebuilt from its ONNX file (``variants.warmstart``: fused
BatchNorm, kept frozen) and the group trains on the joint recipe's loss
(``variants.joint.joint_loss``: the members' own losses, with distillation from the
reference's outputs for the members that distilled, and the NLL of their mean softmax),
SGD with Nesterov momentum and a cosine schedule. The reference's log-probabilities on the
training images (plain and mirrored) come from its ONNX file. After every epoch the
validation ensemble accuracy (sum of top-2) is measured; the best epoch (the warm start
counts as epoch 0) is kept. The run checkpoints every epoch into RUN_DIR and resumes. At
the end the reference and the chosen members are exported as a new family folder; the
test split is evaluated once, for the record, after the choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from swarm.inference.manifest import file_sha256
from variants import datasets, ensemble, runtime
from variants.datasets import DatasetError, Splits
from variants.warmstart import Member, WarmStartError, model_from_onnx, read_family, train_mode

DEFAULT_LR = 0.01
DEFAULT_BETA = 0.5
MOMENTUM = 0.9
K = 2  # the swarm's vote: sum of each member's top-2 probabilities
LOG_EVERY = 50  # steps between progress lines
KEPT = "warm start kept: no fine-tuned epoch beat it on validation"


def log(event: str, **fields: Any) -> None:
    from variants.trainer import log as trainer_log

    trainer_log(event, **fields)


def store_onnx_teacher(ref: Member, splits: Splits, run_dir: Path, threads: int) -> Path:
    """The reference's log-probabilities on the training images (plain, mirrored), from ONNX.

    Log-probabilities are logits up to a per-row constant: all distillation needs.
    """
    import torch

    path = run_dir / "teacher.pt"
    sha = file_sha256(ref.path)
    n = len(splits.train)
    if path.exists():
        t = torch.load(path, map_location="cpu", weights_only=False)
        if t.get("source_sha256") == sha and int(t["plain"].shape[0]) == n:
            return path
        raise SystemExit(
            f"error: {path} was computed from another reference or training split; "
            "move it away or use another --run-dir"
        )
    sess = runtime.session(ref.path, threads=threads)
    tiny = np.float32(np.finfo(np.float32).tiny)

    def log_probs(flip: bool) -> Any:
        outs = []
        for i in range(0, n, 1000):
            x = splits.train.as_float(i, i + 1000)
            if flip:
                x = np.ascontiguousarray(x[..., ::-1])
            p = sess.run(None, {"input": x})[0]
            outs.append(np.log(np.maximum(p, tiny)))
        return torch.from_numpy(np.concatenate(outs))

    t0 = time.monotonic()
    plain = log_probs(False)
    flipped = log_probs(True) if splits.hflip else plain
    from variants.trainer import atomic_save

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_save({"plain": plain, "flipped": flipped, "source_sha256": sha}, path)
    log("tune.teacher", images=n, seconds=round(time.monotonic() - t0, 1), source=str(ref.path))
    return path


def val_probs(models: list[Any], images: Any) -> list[np.ndarray]:
    """Each model's softmax probabilities on ``images`` (eval mode, no augmentation)."""
    import torch

    from variants.trainer import evaluate_logits

    return [torch.softmax(evaluate_logits(m, images, "cpu"), 1).numpy() for m in models]


def measure(probs: list[np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    """Validation ensemble accuracy (sum of top-2) and each member's accuracy."""
    return {
        "val_ensemble_accuracy": round(ensemble.ensemble_accuracy(probs, labels, K), 5),
        "val_accuracy": [round(ensemble.accuracy(p.argmax(1), labels), 5) for p in probs],
    }


def cosine(total: int) -> Any:
    """The learning rate's factor at each step: a half cosine from 1 to 0."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def _splits_for(manifest: dict[str, Any], folder: Path) -> Splits:
    source = manifest.get("dataset") or {"kind": "fashion-mnist"}
    splits = datasets.from_source(source)
    inp = manifest["input"]
    if (inp.get("channels"), inp.get("height")) != (splits.input.channels, splits.input.size):
        raise WarmStartError(
            f"{folder}/manifest.json takes {inp.get('channels')}x{inp.get('height')} input, "
            f"its dataset {splits.name} gives {splits.input.channels}x{splits.input.size}"
        )
    return splits


def _config(args: argparse.Namespace, manifest: dict[str, Any], members: list[Member]) -> dict:
    return {
        "family": str(args.family),
        "family_id": manifest.get("family", {}).get("id"),
        "members": [m.candidate for m in members],
        "sha256": [file_sha256(m.path) for m in members],
        "epochs": args.epochs,
        "lr": args.lr,
        "beta": args.beta,
        "batch": args.batch,
        "seed": args.seed,
        "train_limit": args.train_limit,
    }


def fine_tune(args: argparse.Namespace) -> dict[str, Any]:
    """Train (resuming), choose the epoch on validation, export; returns the result."""
    import torch

    from variants.joint import joint_loss
    from variants.trainer import (
        DeviceImages,
        atomic_save,
        epoch_batches,
        param_groups,
        teacher_rows,
    )

    torch.set_num_threads(args.threads)
    manifest, members = read_family(args.family)
    splits = _splits_for(manifest, args.family)
    fmt_kw = {"fmt": _fmt(splits), "num_classes": splits.num_classes}
    ref, variants = members[0], members[1:]
    if not variants:
        raise WarmStartError(f"{args.family}/manifest.json lists no variants to fine-tune")
    recipes = [
        dataclasses.replace(
            m.recipe,
            epochs=args.epochs,
            lr=args.lr,
            batch=args.batch,
            seed=args.seed,
            joint="tune",
            joint_beta=args.beta,
            train_limit=args.train_limit,
        )
        for m in variants
    ]
    models = [model_from_onnx(m.path, m.recipe, **fmt_kw) for m in variants]
    if args.channels_last:
        models = [m.to(memory_format=torch.channels_last) for m in models]
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    images = DeviceImages(splits.train.images, "cpu", args.train_limit)
    labels = torch.from_numpy(np.asarray(splits.train.labels[: images.n]))
    val_images = DeviceImages(splits.val.images, "cpu")
    val_y = np.asarray(splits.val.labels)
    teacher = None
    if any(r.distill for r in recipes):
        t = torch.load(store_onnx_teacher(ref, splits, run_dir, args.threads), weights_only=False)
        teacher = (t["plain"], t["flipped"])
    groups = [
        g
        for m, r in zip(models, recipes, strict=True)
        for g in param_groups(list(m.parameters()), r.weight_decay)
    ]
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=MOMENTUM, nesterov=True)
    steps = max(1, images.n // args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps * args.epochs))
    erase_p = max(r.erase_p for r in recipes)

    def step(idx: Any, x: Any, y: Any, flip: Any) -> float:
        for m in models:
            train_mode(m)
        logits = [m(x) for m in models]
        loss = joint_loss(logits, y, recipes, teacher_rows(teacher, idx, flip), args.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return float(loss.detach())

    def batches(epoch: int) -> Any:
        return epoch_batches(
            images,
            labels,
            count=images.n,
            seed=args.seed,
            epoch=epoch,
            batch=args.batch,
            steps=steps,
            erase_p=erase_p,
            hflip=splits.hflip,
            device="cpu",
        )

    if args.time_steps:
        times = []
        for i, (idx, x, y, flip) in enumerate(batches(0)):
            if i > args.time_steps:
                break
            t0 = time.monotonic()
            step(idx, x, y, flip)
            times.append(time.monotonic() - t0)
        per = float(np.median(times[1:] or times))
        out = {"seconds_per_step": round(per, 3), "steps_per_epoch": steps}
        out["seconds_per_epoch"] = round(per * steps, 1)
        log("tune.timing", members=len(models), batch=args.batch, threads=args.threads, **out)
        return out

    config = _config(args, manifest, members)
    torch.manual_seed(args.seed)  # dropout; a resumed run restores the generator's state
    ckpt_path = run_dir / "ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck["config"] != config:
            changed = sorted(k for k in config if ck["config"].get(k) != config[k])
            raise SystemExit(
                f"error: {ckpt_path} belongs to a run with other settings ({', '.join(changed)}); "
                "use the same options to resume, or another --run-dir"
            )
        for m, state in zip(models, ck["models"], strict=True):
            m.load_state_dict(state)
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        torch.set_rng_state(ck["rng"])
        start, history, best = ck["epoch"], ck["history"], ck["best"]
        log("tune.resume", epoch=start)
    else:
        start = 0
        rec = {"epoch": 0, **measure(val_probs(models, val_images), val_y)}
        history = [rec]
        best = {"epoch": 0, "score": rec["val_ensemble_accuracy"], "models": _states(models)}
        log("tune.epoch", epochs=args.epochs, **rec)
    t_start = time.monotonic()
    for epoch in range(start, args.epochs):
        t0 = time.monotonic()
        loss_sum = 0.0
        for i, (idx, x, y, flip) in enumerate(batches(epoch)):
            loss_sum += step(idx, x, y, flip)
            if (i + 1) % LOG_EVERY == 0:
                log(
                    "tune.progress",
                    epoch=epoch + 1,
                    step=i + 1,
                    steps=steps,
                    loss=round(loss_sum / (i + 1), 4),
                    s_per_step=round((time.monotonic() - t0) / (i + 1), 3),
                )
        rec = {
            "epoch": epoch + 1,
            "loss": round(loss_sum / steps, 5),
            **measure(val_probs(models, val_images), val_y),
            "lr_end": round(sched.get_last_lr()[0], 6),
            "seconds": round(time.monotonic() - t0, 1),
        }
        history.append(rec)
        if rec["val_ensemble_accuracy"] > best["score"]:
            best = {"epoch": epoch + 1, "score": rec["val_ensemble_accuracy"]}
            best["models"] = _states(models)
        eta = (time.monotonic() - t_start) / (epoch + 1 - start) * (args.epochs - epoch - 1)
        log("tune.epoch", epochs=args.epochs, best_epoch=best["epoch"], eta_s=round(eta), **rec)
        atomic_save(
            {
                "config": config,
                "epoch": epoch + 1,
                "models": _states(models),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "rng": torch.get_rng_state(),
                "history": history,
                "best": best,
            },
            ckpt_path,
        )
    for m, state in zip(models, best["models"], strict=True):
        m.load_state_dict(state)
        m.eval()
    log("tune.chosen", epoch=best["epoch"], val_ensemble_accuracy=best["score"])
    reference = model_from_onnx(ref.path, ref.recipe, **fmt_kw)
    return export(args, manifest, members, recipes, [reference, *models], history, best, splits)


def _fmt(splits: Splits) -> Any:
    from variants.trainer import input_format

    return input_format(splits)


def _states(models: list[Any]) -> list[dict[str, Any]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]


def export(
    args: argparse.Namespace,
    manifest: dict[str, Any],
    members: list[Member],
    recipes: list[Any],
    models: list[Any],
    history: list[dict[str, Any]],
    best: dict[str, Any],
    splits: Splits,
) -> dict[str, Any]:
    """Write the new family folder; then measure the test split once, for the record."""
    from variants.export import export_family
    from variants.models import count_macs

    names = [m.candidate for m in members]
    by_name = dict(zip(names, models, strict=True))
    val_y = np.asarray(splits.val.labels)
    probs = dict(zip(names, val_probs(models, _val_images(splits)), strict=True))
    finals = {
        n: {"val_accuracy": ensemble.accuracy(probs[n].argmax(1), val_y), "recipe": {}}
        for n in names
    }
    for m, r in zip(members, [members[0].recipe, *recipes], strict=True):
        finals[m.candidate]["recipe"] = dataclasses.asdict(r)
    source = {
        "family": manifest.get("family", {}).get("name"),
        "id": manifest.get("family", {}).get("id"),
        "folder": str(args.family),
    }
    command = _command(args)
    entries = {members[0].candidate: {**members[0].entry["recipe"], "re_exported_from": source}}
    for m, r in zip(members[1:], recipes, strict=True):
        entries[m.candidate] = {
            "command": command,
            "kind": "joint fine-tune" if best["epoch"] else KEPT,
            "candidate": m.candidate,
            "warm_started_from": {**source, "model": m.name, "sha256": file_sha256(m.path)},
            "seed": r.seed,
            "epochs": args.epochs,
            "chosen_epoch": best["epoch"],
            "distilled": r.distill,
            "trained_on": "cpu",
            "lr": r.lr,
            "schedule": f"cosine to 0, SGD Nesterov momentum {MOMENTUM}",
            "joint_beta": r.joint_beta,
            "batch": r.batch,
            "weight_decay": r.weight_decay,
            "label_smoothing": r.label_smoothing,
            "erase_p": r.erase_p,
            "batchnorm": "folded into the convolutions, frozen",
            "base_recipe": m.entry.get("recipe", {}),
        }
    selection = {
        "members": names[1:],
        "rule": "the source family's variants, jointly fine-tuned; the epoch (0: the warm "
        f"start) with the highest validation ensemble accuracy (sum of top-{K}) is kept",
        "warm_started_from": source,
        "chosen_epoch": best["epoch"],
        "val_ensemble_accuracy": best["score"],
        "epochs": [{k: v for k, v in h.items() if k != "seconds"} for h in history],
    }
    ns = argparse.Namespace(
        data=splits.name,
        plan="tune",
        family_name=args.family_name or manifest.get("family", {}).get("name"),
        latency_runs=args.latency_runs,
    )
    macs = {n: count_macs(m) for n, m in by_name.items()}
    out = export_family(selection, finals, by_name, macs, splits, ns, args.out_dir, entries)
    # The record: the new ensemble on the held-out test split, measured once, after the choice.
    files = [args.out_dir / e["file"] for e in out["models"] if e["role"] == "variant"]
    test_probs = [runtime.predict_images(f, splits.test.images) for f in files]
    val_onnx = [runtime.predict_images(f, splits.val.images) for f in files]
    test_y = np.asarray(splits.test.labels)
    result = {
        "family": str(args.out_dir),
        "family_id": out["family"]["id"],
        "chosen_epoch": best["epoch"],
        "val_ensemble_accuracy": best["score"],
        "val_ensemble_accuracy_onnx": round(ensemble.ensemble_accuracy(val_onnx, val_y, K), 5),
        "test_ensemble_accuracy": round(ensemble.ensemble_accuracy(test_probs, test_y, K), 5),
        "models": {
            e["name"]: {"val_accuracy": e["val_accuracy"], "test_accuracy": e["test_accuracy"]}
            for e in out["models"]
        },
        "history": history,
    }
    (args.run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    log("tune.result", **{k: v for k, v in result.items() if k != "history"})
    return result


def _val_images(splits: Splits) -> Any:
    from variants.trainer import DeviceImages

    return DeviceImages(splits.val.images, "cpu")


def _command(args: argparse.Namespace) -> str:
    return "python -m variants.tune " + shlex.join(
        [
            "--family",
            str(args.family),
            "--epochs",
            str(args.epochs),
            "--lr",
            str(args.lr),
            "--beta",
            str(args.beta),
            "--batch",
            str(args.batch),
            "--seed",
            str(args.seed),
        ]
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m variants.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--family", type=Path, required=True, help="the family folder to start from")
    p.add_argument("--epochs", type=int, default=8, help="epochs of fine-tuning (default: 8)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (cosine)")
    p.add_argument("--beta", type=float, default=DEFAULT_BETA, help="weight of the ensemble's loss")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="order and augmentation of the batches")
    p.add_argument("--threads", type=int, default=1, help="PyTorch and onnxruntime threads")
    p.add_argument("--run-dir", type=Path, default=Path("runs/tune"), help="checkpoints")
    p.add_argument("--out-dir", type=Path, default=None, help="the new family folder")
    p.add_argument("--family-name", default=None, help="default: the source family's name")
    p.add_argument("--train-limit", type=int, default=0, help="train on the first N images")
    p.add_argument("--latency-runs", type=int, default=1000, help="per model, at export")
    p.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="train in the default memory format",
    )
    p.add_argument(
        "--time-steps", type=int, default=0, help="time this many steps, print, and exit"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch < 1 or args.threads < 1 or args.lr <= 0:
        p.error("--epochs, --batch, --threads and --lr must be positive")
    if not 0.0 <= args.beta <= 1.0:
        p.error("--beta must be within 0..1")
    if args.out_dir is None and not args.time_steps:
        p.error("--out-dir is required (the new family folder)")
    if args.out_dir is not None and args.out_dir.resolve() == args.family.resolve():
        p.error("--out-dir must not be the source family: write the new family elsewhere")
    try:
        fine_tune(args)
    except (WarmStartError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
