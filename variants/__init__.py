"""Variant families: a MobileNetV2 reference and light variants for any image dataset.

A family is a folder (``manifest.json`` and ONNX files); the shipped ones live under
``families/``, Fashion-MNIST's being the default. Training and export need PyTorch (the
``train`` extra); loading data, evaluating a family's ONNX files and the ensemble
arithmetic need only numpy and onnxruntime.
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
FAMILIES_DIR = PACKAGE_DIR / "families"
DEFAULT_FAMILY_DIR = FAMILIES_DIR / "fashion-mnist"
MANIFEST_PATH = DEFAULT_FAMILY_DIR / "manifest.json"
MODELS_DIR = DEFAULT_FAMILY_DIR / "models"

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
