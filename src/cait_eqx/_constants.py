"""Constants shared by several rooms, defined once (pure Python: the command line's flags read them)."""

__all__ = [
    "BAD_IMAGE_POLICIES", "DEFAULT_LORA_TARGETS", "ERASE_MODES", "IMAGENET_MEAN", "IMAGENET_STD",
    "INTERPOLATIONS", "LORA_TARGETS", "NORMALIZATIONS", "DATA_WORKER_NAME",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""The per-channel mean of ImageNet images in [0, 1] (RGB), which the published CaiT weights expect."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The per-channel standard deviation of ImageNet images in [0, 1] (RGB)."""
NORMALIZATIONS = ("none", "imagenet")
"""What the model sees after pixels are scaled to [0, 1]: unchanged ("none"), or standardised ("imagenet")."""
BAD_IMAGE_POLICIES = ("error", "skip")
"""What a training image that cannot be read does: stop the run, naming it, or be replaced and counted."""
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
"""The resampling filters of the data pipeline's resized crops (PIL's)."""
ERASE_MODES = ("pixel", "rand", "const")
"""Random erasing's fills (timm's): per-pixel normal values, one normal value per channel, or zeros."""
LORA_TARGETS = ("qkv", "q", "k", "v", "proj", "fc1", "fc2", "head")
"""The layers `cait_eqx.lora` can adapt, by their timm names: the self-attention blocks' fused `qkv`, the
class-attention blocks' `q`, `k`, `v`, the attention output `proj` and the MLP's `fc1`, `fc2` (in both
kinds of block), and the classifier `head`."""
DEFAULT_LORA_TARGETS = ("qkv", "q", "k", "v", "proj", "fc1", "fc2")
"""What `cait_eqx.lora` adapts unless told otherwise: every Linear of the attentions and MLPs, both stages."""
DATA_WORKER_NAME = "cait-eqx-data-worker"
"""The process name of the data workers (`cait_eqx.data.WorkerPool`), followed by their number. The package
switches its checking hook off in a process of that name (see `cait_eqx.TYPECHECKING_ENABLED`)."""
