"""cait_eqx: CaiT ("Going deeper with Image Transformers") in Equinox.

Runtime shape checking (jaxtyping + beartype) is on for every module call and public function of this
package, including its subpackages. Set the environment variable `CAIT_EQX_TYPECHECK=0` before the first
`import cait_eqx` to switch it off. It is always off in the package's own data worker processes, which run no
array code and must not import JAX.

The public names below are imported on first use (`cait_eqx._lazy`), so `import cait_eqx` is cheap and the
`cait-eqx` command answers `--help` at once; `from cait_eqx import CaiT` works as usual.
"""

import os as _os
import sys as _sys
from typing import TYPE_CHECKING

from ._constants import DATA_WORKER_NAME as _DATA_WORKER_NAME


def _in_data_worker() -> bool:
    """Whether this process is one of the package's data workers (`cait_eqx.data.WorkerPool`). A spawned
    worker imports its parent's main script (as `__mp_main__`) before it runs any code of ours, after
    multiprocessing has given it its name: a main script that imports `cait_eqx` (the `cait-eqx` command
    does) must not switch on, in the worker, the hook whose first checked function imports JAX."""
    multiprocessing = _sys.modules.get("multiprocessing")
    if multiprocessing is None:
        return False
    return multiprocessing.current_process().name.startswith(_DATA_WORKER_NAME)


TYPECHECKING_ENABLED: bool = _os.environ.get("CAIT_EQX_TYPECHECK", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
) and not _in_data_worker()

# Pure-Python modules that `cait-eqx --help` imports and that hold no array code: left unchecked, because the
# first function jaxtyping's hook decorates imports JAX (seconds), and the help must answer at once.
_UNCHECKED = frozenset({"_spec", "_config", "_constants", "_lazy", "_xla_flags", "cli", "training._config"})


def _checked_modules() -> list[str]:
    """The modules the import hook checks: every module of the package but `_UNCHECKED` (a subpackage holding
    an unchecked module is listed module by module; its lazy `__init__` has no code to check)."""
    import pkgutil
    from pathlib import Path

    found = []
    for module in pkgutil.iter_modules(__path__):
        if module.name in _UNCHECKED:
            continue
        if module.ispkg and any(u.startswith(module.name + ".") for u in _UNCHECKED):
            for child in pkgutil.iter_modules([str(Path(__path__[0]) / module.name)]):
                if f"{module.name}.{child.name}" not in _UNCHECKED:
                    found.append(f"{__name__}.{module.name}.{child.name}")
        else:
            found.append(f"{__name__}.{module.name}")
    return found


if TYPECHECKING_ENABLED:
    from jaxtyping import install_import_hook as _install_import_hook

    # Installed for the life of the process, so `cait_eqx.training` etc. are checked when imported later too.
    _install_import_hook(_checked_modules(), "beartype.beartype")

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._atomic import (
        DiskFullError as DiskFullError,
        NotWritableError as NotWritableError,
        StorageError as StorageError,
        check_writable_dir as check_writable_dir,
    )
    from ._batch import (
        CHUNK_BUDGET_BYTES as CHUNK_BUDGET_BYTES,
        TRAIN_CHUNK_TOKENS as TRAIN_CHUNK_TOKENS,
        auto_chunk as auto_chunk,
        auto_train_chunk as auto_train_chunk,
        batched as batched,
        chunked_value_and_grad as chunked_value_and_grad,
    )
    from ._blocks import ClassAttentionBlock as ClassAttentionBlock, LayerScaleBlock as LayerScaleBlock
    from ._config import (
        REMAT_POLICIES as REMAT_POLICIES,
        CaiTConfig as CaiTConfig,
        default_init_values as default_init_values,
    )
    from ._config_check import StaleConfigError as StaleConfigError
    from ._constants import (
        DEFAULT_LORA_TARGETS as DEFAULT_LORA_TARGETS,
        IMAGENET_MEAN as IMAGENET_MEAN,
        IMAGENET_STD as IMAGENET_STD,
        LORA_TARGETS as LORA_TARGETS,
    )
    from ._export import EXPORT_PLATFORMS as EXPORT_PLATFORMS, export as export
    from ._io import load as load, load_timm as load_timm, save as save
    from ._layers import (
        ClassAttention as ClassAttention,
        Mlp as Mlp,
        TalkingHeadAttention as TalkingHeadAttention,
    )
    from ._lora import (
        has_lora as has_lora,
        load_lora as load_lora,
        lora as lora,
        lora_settings as lora_settings,
        lora_trainable as lora_trainable,
        merge_lora as merge_lora,
        save_lora as save_lora,
    )
    from ._model import CaiT as CaiT
    from ._preprocess import (
        Prediction as Prediction,
        format_top_k as format_top_k,
        imagenet_class_names as imagenet_class_names,
        preprocess as preprocess,
        top_k as top_k,
    )
    from ._pretrained import (
        PretrainedWeightsUnavailable as PretrainedWeightsUnavailable,
        create_model as create_model,
        hub_repo_id as hub_repo_id,
        pretrained_weights_file as pretrained_weights_file,
    )
    from ._primitives import (
        DropPath as DropPath,
        LayerNorm as LayerNorm,
        LayerScale as LayerScale,
        Linear as Linear,
        LoRAError as LoRAError,
        LoRALinear as LoRALinear,
        PatchEmbed as PatchEmbed,
        PatchProjection as PatchProjection,
    )
    from ._spec import (
        OneOf as OneOf,
        Real as Real,
        Spec as Spec,
        Whole as Whole,
        flag_name as flag_name,
        specs as hyperparameters,  # noqa: F401 — a public name read by `_lazy`; renamed, so not `X as X`
    )
    from ._surgery import (
        adapt_input_channels as adapt_input_channels,
        resample_pos_embed as resample_pos_embed,
        reset_classifier as reset_classifier,
        set_input_size as set_input_size,
        with_compute_dtype as with_compute_dtype,
        with_config_from_arrays as with_config_from_arrays,
        with_dropout as with_dropout,
        with_dynamic_img_size as with_dynamic_img_size,
        with_remat as with_remat,
    )
    from ._timm import (
        WeightsError as WeightsError,
        from_timm_state_dict as from_timm_state_dict,
        infer_config as infer_config,
        timm_keys as timm_keys,
        to_timm_state_dict as to_timm_state_dict,
    )
    from ._variants import list_models as list_models, variant_config as variant_config
    from ._xla_flags import (
        cpu_isa as cpu_isa,
        recommended_xla_flags as recommended_xla_flags,
        with_recommended_xla_flags as with_recommended_xla_flags,
        xla_flags_in_force as xla_flags_in_force,
    )
else:
    from ._lazy import attach as _attach

    __getattr__, __dir__, __all__ = _attach(__name__, __file__)
