"""Architecture registry: build the classifiers C&C purifies, by name.

>>> from cnc_core.models import create_model, list_models, model_info
>>> model = create_model("resnet18", num_classes=10, in_chans=3, width=16)

Parameter names match torchvision (ResNet, VGG, MobileNet-V2) or BackdoorBench
(PreAct-ResNet-18), so users' state dicts load with ``load_state_dict`` unchanged. Importing
this package only fills the registry; it does not seed, allocate or touch files.
"""

from __future__ import annotations

from . import mobilenet_v2 as _mobilenet_v2  # noqa: F401  (registers its models)
from . import preact_resnet as _preact_resnet  # noqa: F401
from . import resnet as _resnet  # noqa: F401
from . import simple as _simple  # noqa: F401
from . import vgg as _vgg  # noqa: F401
from ._registry import ModelInfo, create_model, list_models, model_info, register_model
from .mobilenet_v2 import InvertedResidual, MobileNetV2
from .preact_resnet import PreActBlock, PreActResNet
from .resnet import BasicBlock, Bottleneck, ResNet
from .simple import SimpleCNN
from .vgg import VGG

__all__ = [
    "VGG",
    "BasicBlock",
    "Bottleneck",
    "InvertedResidual",
    "MobileNetV2",
    "ModelInfo",
    "PreActBlock",
    "PreActResNet",
    "ResNet",
    "SimpleCNN",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
]
