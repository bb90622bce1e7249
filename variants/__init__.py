"""The variant family: a MobileNetV2 reference and light variants, trained on Fashion-MNIST.

Training and export need PyTorch (the ``train`` extra); loading data, evaluating the
shipped ONNX files and the ensemble arithmetic need only numpy and onnxruntime.
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
MANIFEST_PATH = PACKAGE_DIR / "manifest.json"
MODELS_DIR = PACKAGE_DIR / "models"

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
