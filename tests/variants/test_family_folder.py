"""An RGB image folder through train, select and export to a family folder the runtime
loads; the joint recipe; the latency budget."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from swarm.errors import ConfigError
from swarm.inference.manifest import load_manifest
from tests.swarm.procs import ProcessGroup
from tests.variants.conftest import needs_torch
from tests.variants.imagefolder import class_image, write_rgb_folder
from variants import budget
from variants.datasets import DatasetError


@needs_torch
@pytest.mark.slow
def test_rgb_folder_trains_exports_and_loads_as_a_family(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One epoch of a tiny family on a generated RGB folder exports a schema-2 family whose
    manifest the runtime reads and verifies, which the evaluation runs on, and which real
    peers serve to a classify of an RGB picture."""
    from variants import evaluate, train

    root = write_rgb_folder(tmp_path / "shapes")
    out = tmp_path / "family"
    rc = train.main(
        [
            "--data", str(root), "--plan", "tiny", "--input-size", "16",
            "--run-dir", str(tmp_path / "run"), "--out-dir", str(out),
            "--min-members", "2", "--max-members", "3", "--no-progress", "--threads", "1",
            "--latency-runs", "50",
        ]
    )  # fmt: skip
    assert rc == 0
    manifest = load_manifest(out, verify=True)
    assert manifest.input.shape == (3, 16, 16)
    assert manifest.class_names == ("class_0", "class_1", "class_2")
    assert manifest.num_classes == 3 and manifest.family_name == "shapes"
    assert len(manifest.variants) >= 2
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["family"]["id"] == manifest.family_id
    assert raw["input"]["pixels"] == {"dtype": "uint8", "layout": "CHW", "range": [0, 255]}
    assert len(raw["input"]["in_graph"]["normalize"]["mean"]) == 3
    assert raw["dataset"]["kind"] == "folder" and raw["dataset"]["skipped_images"] == 1
    for m in raw["models"]:
        assert 0.0 <= m["test_accuracy"] <= 1.0 and m["latency_ms"] > 0
    assert "skipped 1 image" in capsys.readouterr().err

    ev = tmp_path / "eval"
    assert (
        evaluate.main(["--family", str(out), "--out", str(ev), "--runs", "10", "--no-plots"]) == 0
    )
    r = json.loads((ev / "evaluation.json").read_text())
    assert r["test_images"] == raw["dataset"]["splits"]["test"]
    assert len(r["subsets"]) == 2 ** len(manifest.variants) - 1

    # Served: peers of the new family on 127.0.0.1 classify an RGB picture of class 1.
    picture = tmp_path / "shape.png"
    class_image(1, seed=4242, size=(48, 36)).save(picture)
    swarm = f"rgb-{uuid.uuid4().hex[:10]}"
    with ProcessGroup(tmp_path / "procs") as group:
        peers = [
            group.start_peer(v.name, swarm=swarm, extra=["--family", str(out), "--ui", "off"])
            for v in manifest.variants[:2]
        ]
        for peer in peers:
            peer.wait_ready()
        done = group.run_module(
            "swarm.classify",
            [
                *("--family", str(out), "--interface", "127.0.0.1", "--swarm", swarm),
                *("--wait-peers", "2", "--wait", "30", "--json", str(picture)),
            ],
            timeout=90,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    [decision] = [json.loads(line) for line in done.stdout.splitlines()]
    assert decision["label"] in manifest.class_names
    assert {r["variant"] for r in decision["replies"]} <= {v.name for v in manifest.variants}
    assert decision["replies"]

    # A swapped model file is caught by its hash, naming the file.
    victim = manifest.variants[0].file
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ConfigError, match=victim.name):
        load_manifest(out, verify=True)


@needs_torch
def test_joint_recipe_trains_members_together_and_resumes(tmp_path: Path) -> None:
    """The joint group trains as one job, writes every member as a candidate, and a
    second run finds them finished."""
    import torch

    from variants import datasets
    from variants.joint import train_joint
    from variants.plans import joint_group, tiny_plan

    torch.set_num_threads(1)
    splits = datasets.load("digits")
    group = [
        r.__class__(**{**r.__dict__, "distill": False})
        for r in joint_group(tiny_plan(8), 8, members=3)
    ]
    train_joint(group, tmp_path, "cpu", progress=False, splits=splits)
    finals = [torch.load(tmp_path / r.name / "final.pt", weights_only=False) for r in group]
    assert [f["recipe"]["joint"] for f in finals] == ["joint"] * 3
    assert len({f["recipe"]["resolution"] for f in finals}) >= 2
    ckpt = torch.load(tmp_path / "joint-group" / "ckpt.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and len(ckpt["models"]) == 3
    mtime = (tmp_path / group[0].name / "final.pt").stat().st_mtime_ns
    train_joint(group, tmp_path, "cpu", progress=False, splits=splits)
    assert (tmp_path / group[0].name / "final.pt").stat().st_mtime_ns == mtime


def test_budget_scales_latency_by_the_device_profile() -> None:
    """A member fits the budget when its latency here times the device's factor does."""
    rpi4 = budget.load_profile("rpi4")
    assert not rpi4.measured and rpi4.factor > 1
    here = budget.load_profile("here")
    lat = {"a": 0.1, "b": 0.5}
    assert budget.within_budget(lat, 1.0, here)[0] == {"a", "b"}
    keep, target = budget.within_budget(lat, 1.0, rpi4)
    assert keep == ({"a", "b"} if 0.5 * rpi4.factor <= 1.0 else {"a"})
    assert target["b"] == pytest.approx(0.5 * rpi4.factor)


def test_unknown_device_profile_says_how_to_make_one(tmp_path: Path) -> None:
    """An unknown profile name or a bad profile file is an error with the fix."""
    with pytest.raises(DatasetError, match=r"python -m variants\.budget"):
        budget.load_profile("toaster")
    bad = tmp_path / "p.json"
    bad.write_text("{}")
    with pytest.raises(DatasetError, match="not a device profile"):
        budget.load_profile(str(bad))


def test_selection_keeps_members_within_the_budget() -> None:
    """With a budget, a candidate over it is never a member, whatever its accuracy."""
    from variants.export import select
    from variants.plans import AUTO_RULES

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    probs = {}
    for name, acc in {"reference": 0.9, "fast": 0.7, "mid": 0.75, "slow": 0.95}.items():
        p = rng.dirichlet(np.ones(3), 60) * 0.1
        right = rng.random(60) < acc
        p[np.arange(60), np.where(right, labels, (labels + 1) % 3)] += 1.0
        probs[name] = p / p.sum(1, keepdims=True)
    finals = {n: {"val_accuracy": float((p.argmax(1) == labels).mean())} for n, p in probs.items()}
    macs = {"reference": 1000, "fast": 50, "mid": 200, "slow": 200}
    picked = select(finals, probs, labels, macs, 2, 3, None, AUTO_RULES, {"fast", "mid"})
    assert "slow" not in picked["members"]
    assert picked["candidates"]["slow"]["within_budget"] is False


@needs_torch
def test_a_split_too_large_for_memory_is_read_from_disk_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the memory limit, training gathers each batch from the on-disk cache; the
    batches hold the same pixels as when the split is held whole."""
    import torch

    from variants import datasets, trainer

    splits = datasets.load(str(write_rgb_folder(tmp_path / "d")), tmp_path / "cache", size=12)
    whole = trainer.DeviceImages(splits.train.images, "cpu")
    monkeypatch.setattr(trainer, "DEVICE_BYTES", 0)
    disk = trainer.DeviceImages(splits.train.images, "cpu")
    assert whole.whole is not None and disk.whole is None
    idx = torch.tensor([5, 0, 3, 3, 1])
    assert torch.equal(disk.take(idx), whole.take(idx))
    assert torch.equal(torch.cat(list(disk.batches(4))), whole.whole)


def test_a_profile_measured_on_a_device_gives_its_factor(tmp_path: Path) -> None:
    """python -m variants.budget writes a profile; loaded here it yields a measured factor
    (the same machine's profile: close to 1)."""
    out = tmp_path / "dev.json"
    assert budget.main(["--out", str(out), "--name", "bench"]) == 0
    raw = json.loads(out.read_text())
    assert set(raw["probe_ms"]) == {"reference", "V1"}
    profile = budget.load_profile(str(out))
    assert profile.measured and profile.name == "bench"
    assert 0.2 < profile.factor < 5.0


@needs_torch
def test_a_budget_no_candidate_meets_trains_none_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Candidates whose untrained graphs miss the budget are dropped before training; with
    none left, selection stops with an error that names the budget."""
    from variants import train

    rc = train.main(
        [
            "--data", "digits", "--plan", "tiny", "--budget-ms", "0.000001",
            "--run-dir", str(tmp_path / "run"), "--out-dir", str(tmp_path / "fam"),
            "--min-members", "1", "--no-progress", "--threads", "1",
        ]
    )  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    (plan,) = [e for e in events if e["event"] == "plan.budget"]
    assert len(plan["dropped"]) == 3
    trained = [e["model"] for e in events if e["event"] == "train.finished"]
    assert trained == ["reference"]
    assert "latency budget" in err and "--budget-ms" in err
