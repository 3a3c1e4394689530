"""fastssl.data: weak/strong multi-view augmentation from one spec, on DALI or torchvision, sharded and resumable.

Entry point::

    from fastssl.data import make_loader, shifted_digits

    loader = make_loader("/data/imagenet/train", ["weak", "mocov2"], batch_size=256, seed=0)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:  # {"views": [teacher (N,3,224,224), student (N,3,224,224)], "index", "label"}
            ...

Modules (one topic each): ``spec`` (ViewSpec), ``presets`` (named views and multi-view recipes), ``sources``
(ImageFolder / (path, label) list / in-memory arrays), ``sampler`` (deterministic DDP shards, resume, per-sample
seeds), ``torchvision_backend``, ``dali_backend``, ``loader`` (make_loader), ``digits``, ``synthetic``, ``subsets``.

Which dataset is used for what (everything offline; nothing is downloaded at run time):

- ``shifted_digits`` (scikit-learn's bundled ``load_digits``, 1,797 real handwritten digits, each resized to
  8-12 px at one fixed random position of a 16x16 canvas; train/test split by base image): the CPU demo and the
  end-to-end training/eval tests -- learnable in minutes on 2 cores (the embedded demo's MoCo v2 lifts kNN accuracy
  from 0.376 at random init to 0.767 in about two minutes, README), with the ``digits_*`` view presets.
- ``make_synthetic_image_folder`` (generated JPEG ImageFolder, class-coloured shapes of varying sizes): loader tests
  (decoding, corrupt files, DALI vs torchvision) and ``benchmarks/bench_data.py`` (images/s at 224 px).
- In-memory arrays with coordinate/colour-coded content (built inside ``tests/test_data_*.py``): the statistical
  parity tests between the backends, where crop windows and flips must be measurable from the pixels.
- ``unbalanced_subset``: ISD Table 4 protocol on a real labelled dataset (ImageNet or any ImageFolder): n large classes
  in full, the rest capped at m per class, plus the balanced index set for kNN evaluation.
"""

from fastssl.data.digits import DigitsSplit, shifted_digits
from fastssl.data.epoch_loader import MultiViewLoader
from fastssl.data.loader import choose_backend, dali_import_error, make_loader
from fastssl.data.presets import PRESETS, RECIPES, get_preset, get_views
from fastssl.data.sampler import ShardedBatchOrder, sample_seeds
from fastssl.data.sources import ArraySource, CorruptImageError, FileSource, as_source, image_folder
from fastssl.data.spec import ViewSpec, resolve_views
from fastssl.data.subsets import UnbalancedSubset, unbalanced_subset
from fastssl.data.synthetic import make_synthetic_image_folder

__all__ = [
    "ArraySource",
    "CorruptImageError",
    "DigitsSplit",
    "FileSource",
    "MultiViewLoader",
    "PRESETS",
    "RECIPES",
    "ShardedBatchOrder",
    "UnbalancedSubset",
    "ViewSpec",
    "as_source",
    "choose_backend",
    "dali_import_error",
    "get_preset",
    "get_views",
    "image_folder",
    "make_loader",
    "make_synthetic_image_folder",
    "resolve_views",
    "sample_seeds",
    "shifted_digits",
    "unbalanced_subset",
]
