"""Training CaiT with Equinox and optax: the DeiT/CaiT recipe, the steps, checkpoints and the fit loop.

- Recipe, as composable optax pieces: `make_optimizer` (AdamW, weight decay masked by `weight_decay_mask`,
  optional clipping and EMA), `warmup_cosine_schedule`, `ema_weights` / `ema_model`.
- Losses and batch mixing: `smooth_labels`, `cross_entropy`, `mixup`, `cutmix`, `mix_batch`.
- Steps: `make_train_step` (one `eqx.filter_jit` around `eqx.filter_value_and_grad`, buffers donated) and
  `make_eval_step` (inference mode); `evaluate` (top-1/top-5, confusion matrix).
- Checkpoints: `save_checkpoint` / `load_checkpoint` (model, optimiser state, key, step, data position;
  atomic; last K kept).
- The loop: `fit(model, train, test, TrainConfig(...), key=..., run_dir=..., resume=...)`, and whole runs
  as directories: `train_run(RunConfig(...), run_dir)`, `resume_run(run_dir)` (what `cait-eqx train` does).
"""

from ._checkpoint import (
    CheckpointError as CheckpointError,
)
from ._checkpoint import (
    CheckpointInfo as CheckpointInfo,
)
from ._checkpoint import (
    CheckpointWarning as CheckpointWarning,
)
from ._checkpoint import (
    list_checkpoints as list_checkpoints,
)
from ._checkpoint import (
    load_checkpoint as load_checkpoint,
)
from ._checkpoint import (
    save_checkpoint as save_checkpoint,
)
from ._loop import (
    FitResult as FitResult,
)
from ._loop import (
    NonFiniteLossError as NonFiniteLossError,
)
from ._loop import (
    TrainConfig as TrainConfig,
)
from ._loop import (
    build_optimizer as build_optimizer,
)
from ._loop import (
    fit as fit,
)
from ._losses import (
    cross_entropy as cross_entropy,
)
from ._losses import (
    cutmix as cutmix,
)
from ._losses import (
    mix_batch as mix_batch,
)
from ._losses import (
    mixup as mixup,
)
from ._losses import (
    smooth_labels as smooth_labels,
)
from ._optim import (
    EmaState as EmaState,
)
from ._optim import (
    decayed_leaf_names as decayed_leaf_names,
)
from ._optim import (
    ema_model as ema_model,
)
from ._optim import (
    ema_weights as ema_weights,
)
from ._optim import (
    make_optimizer as make_optimizer,
)
from ._optim import (
    warmup_cosine_schedule as warmup_cosine_schedule,
)
from ._optim import (
    weight_decay_mask as weight_decay_mask,
)
from ._run import (
    DEFAULT_MODEL as DEFAULT_MODEL,
)
from ._run import (
    RunConfig as RunConfig,
)
from ._run import (
    RunSummary as RunSummary,
)
from ._run import (
    build_model as build_model,
)
from ._run import (
    load_run_config as load_run_config,
)
from ._run import (
    load_run_data as load_run_data,
)
from ._run import (
    resume_run as resume_run,
)
from ._run import (
    train_run as train_run,
)
from ._steps import (
    EvalResult as EvalResult,
)
from ._steps import (
    StepConfig as StepConfig,
)
from ._steps import (
    evaluate as evaluate,
)
from ._steps import (
    make_eval_step as make_eval_step,
)
from ._steps import (
    make_train_step as make_train_step,
)
