"""cait_eqx: CaiT ("Going deeper with Image Transformers") in Equinox.

Runtime shape checking (jaxtyping + beartype) is on for every module call and public function of this
package, including its subpackages. Set the environment variable `CAIT_EQX_TYPECHECK=0` before the first
`import cait_eqx` to switch it off.
"""

import os as _os

TYPECHECKING_ENABLED: bool = _os.environ.get("CAIT_EQX_TYPECHECK", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)

if TYPECHECKING_ENABLED:
    from jaxtyping import install_import_hook as _install_import_hook

    # Installed for the life of the process, so `cait_eqx.training` etc. are checked when imported later too.
    _install_import_hook("cait_eqx", "beartype.beartype")

from ._blocks import ClassAttentionBlock as ClassAttentionBlock, LayerScaleBlock as LayerScaleBlock
from ._hugepages import restart_with_huge_pages as restart_with_huge_pages
from ._hub import (
    PretrainedWeightsUnavailable as PretrainedWeightsUnavailable,
    hub_repo_id as hub_repo_id,
    pretrained_weights_file as pretrained_weights_file,
)
from ._io import load as load, load_timm as load_timm, save as save
from ._layers import (
    ClassAttention as ClassAttention,
    DropPath as DropPath,
    LayerNorm as LayerNorm,
    LayerScale as LayerScale,
    Linear as Linear,
    Mlp as Mlp,
    PatchEmbed as PatchEmbed,
    TalkingHeadAttention as TalkingHeadAttention,
    default_init_values as default_init_values,
)
from ._model import CaiT as CaiT, CaiTConfig as CaiTConfig, with_compute_dtype as with_compute_dtype
from ._preprocess import (
    IMAGENET_MEAN as IMAGENET_MEAN,
    IMAGENET_STD as IMAGENET_STD,
    Prediction as Prediction,
    format_top_k as format_top_k,
    imagenet_class_names as imagenet_class_names,
    preprocess as preprocess,
    top_k as top_k,
)
from ._variants import create_model as create_model, list_models as list_models, variant_config as variant_config
from ._weights import (
    WeightsError as WeightsError,
    from_timm_state_dict as from_timm_state_dict,
    infer_config as infer_config,
    reset_classifier as reset_classifier,
    resample_pos_embed as resample_pos_embed,
    set_input_size as set_input_size,
    timm_keys as timm_keys,
    to_timm_state_dict as to_timm_state_dict,
)

__version__ = "0.1.0"
