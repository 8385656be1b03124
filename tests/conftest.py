"""Suite-wide test setup."""
from tests import torchvision_stub

torchvision_stub.hide_if_broken()  # a CUDA torchvision beside the CPU torch would break every transformers import
