"""Training CaiT with Equinox and optax: the DeiT/CaiT recipe, the steps, checkpoints, `fit`, runs.

One private module per concern; their public names:

- The recipe, declared once (`_config.py`): `TrainConfig` (every field with its default, check and help; its
  `"step"` fields make `StepConfig`), and `RunConfig` (model, data and recipe of a whole run).
- The optimiser, as composable optax pieces (`_optim.py`): `make_optimizer` (AdamW, weight decay masked by
  `weight_decay_mask`, optional clipping, EMA, layer-wise learning-rate decay and a frozen backbone),
  `warmup_cosine_schedule`, `ema_weights` / `ema_model`, `layer_decay_scales` / `scale_by_layer_decay`, and
  `build_optimizer(config, steps_per_epoch)`.
- Losses and batch mixing (`_losses.py`): `smooth_labels`, `cross_entropy`, `distillation_loss` (DeiT's hard
  and soft distillation; `fit(..., teacher=...)`, `check_teacher`), `mixup`, `cutmix`, `mix_batch`.
- What trains (`_freeze.py`): `trainable_params` (the parameters `TrainConfig.freeze` leaves to train: what
  the step differentiates and the optimiser holds state for), `merge_trainable`, `trainable_model`,
  `check_freeze`.
- Steps (`_steps.py`): `make_train_step` (one `eqx.filter_jit` around `eqx.filter_value_and_grad`, buffers
  donated) and `make_eval_step` (inference mode); `evaluate` (top-1/top-5, confusion matrix). Compiled for
  a mesh of devices and hosts by `cait_eqx.parallel`, the room that shares this package's layer.
- Checkpoints (`_checkpoint.py`): `save_checkpoint` / `load_checkpoint` (model, optimiser state, key, step,
  data position; atomic; last K kept).
- Training (`_fit.py`): `fit(model, train, test, TrainConfig(...), key=..., run_dir=..., resume=...)`,
  stopped cooperatively by SIGINT/SIGTERM (`StopSignals`); `TrainSteps`, a recipe's steps compiled for a
  mesh, to share between `fit` calls; what it asks of the data: `train_transform`, `eval_transform`,
  `check_images`; `with_adapters` (the LoRA adapters `TrainConfig.lora_rank` puts on the model).
- Runs as directories (`_run.py`): `Run(run_dir)` (its files, config, metrics, models, data),
  `train_run(RunConfig(...), run_dir)` and `resume_run(run_dir)` (what `cait-eqx train` does).
- Starting weights (`_weight_sources.py`): `load_source` (a variant name, a checkpoint file or a run
  directory), `adapt_to_data` (input size, channels and classes of the data), `initial_model` (both, for
  `RunConfig.init`).

The names are imported on first use (`cait_eqx._lazy`): `import cait_eqx.training` does not import JAX.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._checkpoint import (
        CheckpointError as CheckpointError,
        CheckpointInfo as CheckpointInfo,
        CheckpointWarning as CheckpointWarning,
        list_checkpoints as list_checkpoints,
        load_checkpoint as load_checkpoint,
        save_checkpoint as save_checkpoint,
    )
    from ._config import (
        DEFAULT_MODEL as DEFAULT_MODEL,
        DISTILLATION_KINDS as DISTILLATION_KINDS,
        FREEZE_MODES as FREEZE_MODES,
        TRACKERS as TRACKERS,
        RunConfig as RunConfig,
        StepConfig as StepConfig,
        TrainConfig as TrainConfig,
        frozen_blocks as frozen_blocks,
    )
    from ._fit import (
        FitResult as FitResult,
        TrainSteps as TrainSteps,
        check_images as check_images,
        check_teacher as check_teacher,
        eval_transform as eval_transform,
        fit as fit,
        train_transform as train_transform,
        with_adapters as with_adapters,
    )
    from ._freeze import (
        check_freeze as check_freeze,
        merge_trainable as merge_trainable,
        trainable_model as trainable_model,
        trainable_params as trainable_params,
    )
    from ._losses import (
        cross_entropy as cross_entropy,
        cutmix as cutmix,
        distillation_loss as distillation_loss,
        mix_batch as mix_batch,
        mixup as mixup,
        smooth_labels as smooth_labels,
    )
    from ._optim import (
        EmaState as EmaState,
        build_optimizer as build_optimizer,
        decayed_leaf_names as decayed_leaf_names,
        ema_model as ema_model,
        ema_weights as ema_weights,
        layer_decay_scales as layer_decay_scales,
        make_optimizer as make_optimizer,
        scale_by_layer_decay as scale_by_layer_decay,
        warmup_cosine_schedule as warmup_cosine_schedule,
        weight_decay_mask as weight_decay_mask,
    )
    from ._run import (
        Run as Run,
        RunSummary as RunSummary,
        build_model as build_model,
        load_run_config as load_run_config,
        load_run_data as load_run_data,
        resume_run as resume_run,
        train_run as train_run,
    )
    from ._signals import StopSignals as StopSignals
    from ._steps import (
        EvalResult as EvalResult,
        NonFiniteLossError as NonFiniteLossError,
        evaluate as evaluate,
        make_eval_step as make_eval_step,
        make_train_step as make_train_step,
    )
    from ._weight_sources import (
        LoadedSource as LoadedSource,
        adapt_to_data as adapt_to_data,
        initial_model as initial_model,
        load_source as load_source,
    )
else:
    from .._lazy import attach as _attach

    __getattr__, __dir__, __all__ = _attach(__name__, __file__)
