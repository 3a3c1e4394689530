"""NVIDIA DALI backend: the same ViewSpec pipeline as the torchvision backend, as a DALI graph.

Each image is decoded once (``fn.decoders.image``, ``device="mixed"`` -- nvJPEG on the GPU -- when the target is
CUDA, CPU otherwise) and every view is cropped from that decoded image with ``fn.random_resized_crop``. The ops
DALI lacks are built from arithmetic: grayscale is ``color_space_conversion`` to GRAY broadcast back over RGB,
solarize is ``x + [x >= t] * (255 - 2x)``, and torchvision's contrast/saturation are blends with the image's gray
mean / gray image. Every random choice is a per-sample ``fn.random.*`` draw; an op applied with probability p is a
blend ``x + coin * (op(x) - x)`` with ``coin ~ Bernoulli(p)``.

Differences from the torchvision backend, all covered by the statistical parity tests: the jitter ops run in a fixed
order (brightness, contrast, saturation, hue) instead of ColorJitter's random order, hue is rotated in DALI's colour
space, and the random stream is DALI's. The batch order (shuffle, sharding, resume) is the shared
:class:`~fastssl.data.sampler.ShardedBatchOrder`, fed through ``fn.external_source``, so both backends see the same
indices in the same batches; augmentation draws are reproducible for a given (seed, epoch, rank, start step).

CPU-only pipelines use ``device_id=None`` (``types.CPU_ONLY_DEVICE_ID`` fails in DALI 2.4).
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from fastssl.data.epoch_loader import Batch, MultiViewLoader
from fastssl.data.sampler import sample_seeds
from fastssl.data.sources import ArraySource, CorruptImageError, decode_file, read_encoded
from fastssl.data.spec import ViewSpec
from fastssl.data.torchvision_backend import default_num_workers


class _Graph:
    """Builds the per-view DALI ops (inside a pipeline with conditionals enabled).

    Colour work stays in uint8, as in the PIL-based reference pipelines: per-sample factors of an op that is not
    applied are set to the identity (no blend pass), and blur/solarize run only on the samples that draw them.
    """

    def __init__(self, gpu: bool) -> None:
        from nvidia.dali import fn, types

        self.fn, self.types, self.gpu = fn, types, gpu

    def coin(self, p: float):
        """Per-sample Bernoulli(p) as float32 0/1 (CPU: used in argument inputs)."""
        return self.fn.cast(self.fn.random.coin_flip(probability=p), dtype=self.types.FLOAT)

    def uniform(self, lo: float, hi: float):
        return self.fn.random.uniform(range=[lo, hi])

    def gray_mean(self, x):
        """Per-sample mean BT.601 luma of an (H, W, 3) uint8 image, from DALI's RGB->GRAY conversion."""
        fn, types = self.fn, self.types
        return fn.reductions.mean(fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY))

    def jitter_and_grayscale(self, x, spec: ViewSpec):
        """torchvision ColorJitter (fixed order b, c, s, h) with probability p, then grayscale with its own p.

        Brightness then contrast around the gray mean m of the input is b * (m + c * (x - m)): one
        ``brightness_contrast`` with ``contrast_center=m`` (torchvision's contrast blends with the mean gray of the
        brightened image, b * m). Saturation is DALI's YIQ chroma scaling, which equals torchvision's blend with the
        BT.601 gray image; grayscale is the same op with saturation 0, so jitter and grayscale share one ``hsv``.
        """
        fn, types = self.fn, self.types
        b, c, s, h = spec.jitter
        on = self.coin(spec.jitter_p) if spec.has_jitter else None
        if on is not None and (b > 0 or c > 0):
            brightness = 1.0 + on * (self.uniform(1.0 - b, 1.0 + b) - 1.0) if b > 0 else 1.0
            contrast = 1.0 + on * (self.uniform(1.0 - c, 1.0 + c) - 1.0) if c > 0 else 1.0
            if c > 0 and self.gpu:  # argument inputs live on the CPU: contrast around a GPU mean is arithmetic
                xf = fn.cast(x, dtype=types.FLOAT)
                mean = fn.reductions.mean(fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY))
                x = fn.cast(brightness * (mean + contrast.gpu() * (xf - mean)), dtype=types.UINT8)
            elif c > 0:
                x = fn.brightness_contrast(
                    x, brightness=brightness, contrast=contrast, contrast_center=self.gray_mean(x)
                )
            else:
                x = fn.brightness_contrast(x, brightness=brightness)
        saturation = 1.0 + on * (self.uniform(1.0 - s, 1.0 + s) - 1.0) if on is not None and s > 0 else None
        hue = on * self.uniform(-360.0 * h, 360.0 * h) if on is not None and h > 0 else None
        if spec.grayscale_p > 0:
            keep_colour = 1.0 - self.coin(spec.grayscale_p)
            saturation = keep_colour if saturation is None else saturation * keep_colour
        if saturation is not None or hue is not None:
            x = fn.hsv(x, saturation=1.0 if saturation is None else saturation, hue=0.0 if hue is None else hue)
        return x

    def view(self, image, spec: ViewSpec, channels_last: bool):
        fn, types = self.fn, self.types
        x = fn.random_resized_crop(
            image,
            size=list(spec.size),
            random_area=list(spec.scale),
            random_aspect_ratio=list(spec.ratio),
            num_attempts=10,
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
        x = self.jitter_and_grayscale(x, spec)
        if spec.blur_p > 0:
            sigma = self.uniform(spec.blur_sigma[0], spec.blur_sigma[1])
            if fn.random.coin_flip(probability=spec.blur_p, dtype=types.BOOL):
                x = fn.gaussian_blur(x, sigma=sigma)
        if spec.solarize_p > 0:
            if fn.random.coin_flip(probability=spec.solarize_p, dtype=types.BOOL):
                xf = fn.cast(x, dtype=types.FLOAT)
                above = fn.cast(xf >= 255.0 * spec.solarize_threshold, dtype=types.FLOAT)
                x = fn.cast(xf + above * (255.0 - 2.0 * xf), dtype=types.UINT8)
        mirror = fn.random.coin_flip(probability=spec.flip_p) if spec.flip_p > 0 else 0
        return fn.crop_mirror_normalize(
            x,
            mean=[255.0 * m for m in spec.mean],
            std=[255.0 * s for s in spec.std],
            mirror=mirror,
            dtype=types.FLOAT,
            output_layout="HWC" if channels_last else "CHW",
        )


class DaliLoader(MultiViewLoader):
    """Multi-view loader running a DALI pipeline (rebuilt per epoch, seeded from (seed, epoch, rank, start step)).

    Files are read in Python (a signature check names non-image files) and decoded by DALI; a decode failure is
    traced back to its file with a Python decode of the files in flight, then raised as CorruptImageError or, with
    ``on_error="skip"``, excluded while the pipeline restarts at the failing step.
    """

    backend = "dali"

    def __init__(self, *args, num_threads: int | None = None, prefetch_queue_depth: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_threads = num_threads or default_num_workers()
        self.prefetch_queue_depth = prefetch_queue_depth
        self.gpu = self.device.type == "cuda"
        self._bad_files: set[int] = set()

    # -- feeding ---------------------------------------------------------------------------------------------
    def _feed(self, epoch: int, start_step: int, in_flight: collections.deque) -> Iterator[tuple[list, list, list]]:
        is_array = isinstance(self.source, ArraySource)
        for idx in self.order.batches(epoch, start_step):
            data, kept = [], []
            for i in idx.tolist():
                if is_array:
                    data.append(self.source.images[i])
                    kept.append(i)
                    continue
                if i in self._bad_files:
                    continue
                try:
                    data.append(read_encoded(self.source.paths[i]))
                    kept.append(i)
                except CorruptImageError as err:
                    if self.on_error == "raise":
                        raise
                    self._skip(i, err)
            if not kept:
                continue
            in_flight.append(kept)
            yield (
                data,
                [np.asarray(i, dtype=np.int64) for i in kept],
                [np.asarray(self.source.labels[i], dtype=np.int64) for i in kept],
            )

    def _skip(self, index: int, err: CorruptImageError) -> None:
        self._bad_files.add(index)
        warnings.warn(f"skipping sample {index}: {err}", RuntimeWarning, stacklevel=3)

    # -- pipeline --------------------------------------------------------------------------------------------
    def _pipeline(self, epoch: int, start_step: int, in_flight: collections.deque):
        from nvidia.dali import fn, pipeline_def, types

        feed = self._feed(epoch, start_step, in_flight)
        is_array = isinstance(self.source, ArraySource)
        key = np.asarray([(self.order.rank << 32) | start_step], dtype=np.int64)
        pipe_seed = int(sample_seeds(self.order.seed, epoch, key)[0] % (2**31 - 1))

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if self.gpu else None,
            seed=pipe_seed,
            prefetch_queue_depth=self.prefetch_queue_depth,
            enable_conditionals=True,
        )
        def multiview():
            data, index, label = fn.external_source(
                source=feed, num_outputs=3, batch=True, dtype=[types.UINT8, types.INT64, types.INT64]
            )
            if is_array:
                image = fn.reshape(data, layout="HWC")
                image = image.gpu() if self.gpu else image
            else:
                image = fn.decoders.image(data, device="mixed" if self.gpu else "cpu", output_type=types.RGB)
            graph = _Graph(self.gpu)
            return (*[graph.view(image, spec, self.channels_last) for spec in self.views], index, label)

        pipe = multiview()
        pipe.build()
        return pipe

    def _to_torch(self, tensor_list) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        out = torch.empty(
            dense.shape(),
            dtype=torch.float32 if dense.dtype.name == "FLOAT" else torch.int64,
            device=self.device if self.gpu else "cpu",
        )
        if self.gpu:
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            out.copy_(torch.from_numpy(np.asarray(dense)))
        return out

    def _locate_bad_file(self, in_flight: collections.deque) -> tuple[int, CorruptImageError] | None:
        """(sample index, error) of the first in-flight sample that does not decode (the sample, not the path: a
        list source may name one file twice)."""
        for kept in in_flight:
            for i in kept:
                try:
                    decode_file(self.source.paths[i])
                except CorruptImageError as err:
                    return i, err
        return None

    def _iter_batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        step = start_step
        while True:
            in_flight: collections.deque = collections.deque()
            pipe = self._pipeline(epoch, step, in_flight)
            try:
                while True:
                    try:
                        outputs = pipe.run()
                    except StopIteration:
                        return
                    except CorruptImageError:
                        raise
                    except Exception as err:  # noqa: BLE001 - DALI raises RuntimeError for any operator failure
                        if isinstance(self.source, ArraySource):
                            raise
                        located = self._locate_bad_file(in_flight)
                        if located is None:
                            raise
                        index, bad = located
                        if self.on_error == "raise":
                            raise bad from err
                        self._skip(index, bad)
                        break  # rebuild at `step`; the feed now leaves the bad file out
                    in_flight.popleft()
                    step += 1
                    yield self._batch(outputs)
            finally:
                del pipe

    def _batch(self, outputs) -> Batch:
        num_views = len(self.views)
        views = [self._to_torch(outputs[v]) for v in range(num_views)]
        if self.channels_last:
            views = [v.permute(0, 3, 1, 2) for v in views]  # NHWC memory viewed as NCHW = channels_last
        index = torch.from_numpy(np.asarray(outputs[num_views].as_tensor()).reshape(-1).copy())
        label = torch.from_numpy(np.asarray(outputs[num_views + 1].as_tensor()).reshape(-1).copy())
        if self.device.type != "cpu":
            index, label = index.to(self.device, non_blocking=True), label.to(self.device, non_blocking=True)
        return {"views": views, "index": index, "label": label}
