"""The named datasets: Fashion-MNIST (Debian package) and scikit-learn's digits.

Both install offline from this project's package sources. Fashion-MNIST keeps its
published split: t10k is the held-out test set, and a fixed stratified 5,000 of the
60,000 training images are the validation split. The digits (1,797 8x8 images of the UCI
optdigits set, bundled with scikit-learn) have no published split: a fixed, stratified
20% is held out as the test set and 15% of the rest is the validation split.
"""

from __future__ import annotations

import numpy as np

from variants import CLASS_NAMES, data
from variants.datasets.base import (
    DatasetError,
    ImageSet,
    InputSpec,
    Splits,
    channel_stats,
    stratified_split,
)

# Fashion-MNIST training-set pixel statistics (of pixel / 255), as the shipped models use.
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530

DIGITS_TEST_FRACTION = 0.20
DIGITS_VAL_FRACTION = 0.15
DIGITS_SEED = 20_231_019
DIGITS_LEVELS = 16  # load_digits' pixels are counts 0..16 (4x4 blocks of a 32x32 bitmap)


def fashion_mnist() -> Splits:
    """Fashion-MNIST: 55,000 train, 5,000 validation, 10,000 held-out test images."""
    train, val = data.split_train_val(data.load_split("train"))
    test = data.load_split("test")

    def chw(split: data.Split) -> ImageSet:
        return ImageSet(split.images[:, None, :, :], split.labels)

    return Splits(
        name="fashion-mnist",
        source={
            "kind": "fashion-mnist",
            "description": "Fashion-MNIST (Debian dataset-fashion-mnist); test = t10k, held out",
            "split_seed": data.SPLIT_SEED,
        },
        class_names=CLASS_NAMES,
        input=InputSpec(channels=1, size=28),
        train=chw(train),
        val=chw(val),
        test=chw(test),
        mean=(FASHION_MEAN,),
        std=(FASHION_STD,),
        hflip=True,
    )


def digits() -> Splits:
    """scikit-learn's handwritten digits, 8x8 grayscale, ten classes, pixels scaled to 0..255."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError(
            "the digits dataset comes with scikit-learn, which is not installed; "
            "install the train extra: pip install -e '.[train]'"
        ) from None
    raw = load_digits()
    images = np.rint(np.asarray(raw.images) * (255.0 / DIGITS_LEVELS)).astype(np.uint8)
    images = np.ascontiguousarray(images[:, None, :, :])
    labels = np.asarray(raw.target, dtype=np.int64)
    rest, test = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SEED, "test")
    tr, val = stratified_split(labels[rest], DIGITS_VAL_FRACTION, DIGITS_SEED + 1, "validation")
    tr, val = rest[tr], rest[val]
    train_set = ImageSet(images[tr], labels[tr])
    mean, std = channel_stats(train_set.images)
    return Splits(
        name="digits",
        source={
            "kind": "digits",
            "description": "scikit-learn load_digits (UCI optdigits, 8x8, pixels 0..16 scaled "
            "to 0..255); a fixed stratified 20% held out as the test set",
            "split_seed": DIGITS_SEED,
            "test_fraction": DIGITS_TEST_FRACTION,
            "val_fraction": DIGITS_VAL_FRACTION,
        },
        class_names=tuple(str(int(n)) for n in raw.target_names),
        input=InputSpec(channels=1, size=8),
        train=train_set,
        val=ImageSet(images[val], labels[val]),
        test=ImageSet(images[test], labels[test]),
        mean=mean,
        std=std,
        hflip=False,  # a mirrored 2 is not a 2
    )


NAMED = {"fashion-mnist": fashion_mnist, "digits": digits}
