"""
The ``SummaryWriter`` methods beyond scalars, text and hparams: histograms,
images, figures, PR curves, custom-scalar layouts, and the methods that are
accepted with one warning (see ``trainstream.integrations.tensorboard``).
A mixin, so that the writer's own module stays about its run and steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from trainstream.integrations import _media

if TYPE_CHECKING:
    from trainstream.api import RunAPI

__all__ = ["FileWriter", "MediaMethods"]


class FileWriter:
    """What ``writer.file_writer`` is here: torch's FileWriter's shape, no event file."""

    def __init__(self, writer: MediaMethods) -> None:
        self._writer = writer

    def get_logdir(self) -> str:
        return self._writer.get_logdir()

    def add_event(self, event: Any, step: Any = None, walltime: Any = None) -> None:
        self._writer._skip("file_writer.add_event")

    def add_summary(self, summary: Any, global_step: Any = None, walltime: Any = None) -> None:
        self._writer._skip("file_writer.add_summary")

    def add_graph(self, graph_profile: Any, walltime: Any = None) -> None:
        self._writer._skip("file_writer.add_graph")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.flush()

    def reopen(self) -> None:
        pass


class MediaMethods:
    """TensorBoard's media methods, publishing media events (``_media``) to ``self._main``."""

    run_name: str
    log_dir: str
    file_writer: FileWriter
    _main: RunAPI
    _warned: set[str]

    def _check_open(self) -> None:
        raise NotImplementedError

    def _name(self, tag: str) -> str:
        raise NotImplementedError

    def _step(self, run: str, name: str, global_step: Any) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def add_histogram(
        self,
        tag: str,
        values: Any,
        global_step: Any = None,
        bins: Any = "tensorflow",
        walltime: float | None = None,
        max_bins: Any = None,
    ) -> None:
        """A ``histogram`` of ``values`` (binned like TensorBoard's, see the module)."""
        name, step = self._media_step("histogram", tag, global_step)
        event = _media.histogram_event(
            self.run_name, name, step, values, walltime, bins=bins, max_bins=max_bins
        )
        self._main._enqueue([event])

    def add_histogram_raw(
        self,
        tag: str,
        min: float,
        max: float,
        num: float,
        sum: float,
        sum_squares: float,
        bucket_limits: Sequence[float],
        bucket_counts: Sequence[float],
        global_step: Any = None,
        walltime: float | None = None,
    ) -> None:
        """A ``histogram`` from TensorBoard's raw form (right edges ``bucket_limits``)."""
        name, step = self._media_step("histogram", tag, global_step)
        buckets = _media.raw_buckets(min, max, bucket_limits, bucket_counts)
        stats = {"min": min, "max": max, "num": num, "sum": sum, "sum_squares": sum_squares}
        stats = {k: float(v) for k, v in stats.items()}
        event = _media.histogram_event(self.run_name, name, step, buckets, walltime, stats=stats)
        self._main._enqueue([event])

    def add_image(
        self,
        tag: str,
        img_tensor: Any,
        global_step: Any = None,
        walltime: float | None = None,
        dataformats: str = "CHW",
    ) -> None:
        """One image (``CHW`` default, ``HWC``, ``HW``) as a PNG ``image`` event."""
        self._image(tag, _media.image_array(img_tensor, dataformats), global_step, walltime)

    def add_images(
        self,
        tag: str,
        img_tensor: Any,
        global_step: Any = None,
        walltime: float | None = None,
        dataformats: str = "NCHW",
    ) -> None:
        """A batch of images (``NCHW`` default, ``NHWC``) as one grid, one ``image`` event."""
        self._image(tag, _media.image_array(img_tensor, dataformats), global_step, walltime)

    def add_image_with_boxes(
        self,
        tag: str,
        img_tensor: Any,
        box_tensor: Any,
        global_step: Any = None,
        walltime: float | None = None,
        rescale: int = 1,
        dataformats: str = "CHW",
        labels: Any = None,
    ) -> None:
        """An image with its boxes (``xyxy``, pixels) drawn in red; labels are not drawn."""
        image = _media.image_array(img_tensor, dataformats).copy()
        height, width = image.shape[:2]
        for box in _media.to_numpy(box_tensor).reshape(-1, 4).tolist():
            x0, y0, x1, y1 = (round(v) for v in box)
            x0, x1 = sorted((min(max(x0, 0), width - 1), min(max(x1, 0), width - 1)))
            y0, y1 = sorted((min(max(y0, 0), height - 1), min(max(y1, 0), height - 1)))
            red = [255, 0, 0, 255][: image.shape[2]]
            image[y0, x0 : x1 + 1] = image[y1, x0 : x1 + 1] = red
            image[y0 : y1 + 1, x0] = image[y0 : y1 + 1, x1] = red
        if labels is not None:
            self._skip("add_image_with_boxes (labels)")
        self._image(tag, image, global_step, walltime)

    def add_figure(
        self,
        tag: str,
        figure: Any,
        global_step: int | None = None,
        close: bool = True,
        walltime: float | None = None,
    ) -> None:
        """A matplotlib figure (or a list: one grid) rendered to PNG; closed if ``close``."""
        import numpy as np

        if isinstance(figure, list):
            arrays = [_media.figure_array(f, close) for f in figure]
            batch = np.stack([a.transpose(2, 0, 1) for a in arrays])
            image = _media.image_array(batch, "NCHW")
        else:
            image = _media.image_array(_media.figure_array(figure, close), "HWC")
        self._image(tag, image, global_step, walltime)

    def add_pr_curve(
        self,
        tag: str,
        labels: Any,
        predictions: Any,
        global_step: Any = None,
        num_thresholds: int = 127,
        weights: Any = None,
        walltime: float | None = None,
    ) -> None:
        """A ``pr_curve`` of binary ``labels`` against ``predictions`` in [0, 1]."""
        name, step = self._media_step("pr_curve", tag, global_step)
        precision, recall, thresholds = _media.pr_curve(
            labels, predictions, num_thresholds, weights
        )
        event = _media.pr_curve_event(
            self.run_name, name, step, precision, recall, thresholds, walltime
        )
        self._main._enqueue([event])

    def add_pr_curve_raw(
        self,
        tag: str,
        true_positive_counts: Any,
        false_positive_counts: Any,
        true_negative_counts: Any,
        false_negative_counts: Any,
        precision: Any,
        recall: Any,
        global_step: Any = None,
        num_thresholds: int = 127,
        weights: Any = None,
        walltime: float | None = None,
    ) -> None:
        """A ``pr_curve`` from precision and recall at ``num_thresholds`` thresholds."""
        name, step = self._media_step("pr_curve", tag, global_step)
        p = [float(v) for v in _media.to_numpy(precision).reshape(-1).tolist()]
        r = [float(v) for v in _media.to_numpy(recall).reshape(-1).tolist()]
        n = len(p)
        thresholds = [i / max(1, n - 1) for i in range(n)]
        event = _media.pr_curve_event(self.run_name, name, step, p, r, thresholds, walltime)
        self._main._enqueue([event])

    def add_custom_scalars(self, layout: Mapping[str, Mapping[str, Any]]) -> None:
        """The run's custom-scalar ``layout``: ``{category: {title: [kind, [tags]]}}``."""
        self._check_open()
        self._main._enqueue([_media.layout_event(self.run_name, layout)])

    def add_custom_scalars_multilinechart(
        self, tags: list[str], category: str = "default", title: str = "untitled"
    ) -> None:
        """A layout of one multiline chart of ``tags``."""
        self.add_custom_scalars({category: {title: ["Multiline", list(tags)]}})

    def add_custom_scalars_marginchart(
        self, tags: list[str], category: str = "default", title: str = "untitled"
    ) -> None:
        """A layout of one margin chart: ``tags`` are value, lower, upper."""
        if len(tags) != 3:
            raise ValueError(f"a margin chart has 3 tags (value, lower, upper), got {tags!r}")
        self.add_custom_scalars({category: {title: ["Margin", list(tags)]}})

    # Accepted, nothing stored: one warning per method and writer

    def add_graph(
        self,
        model: Any,
        input_to_model: Any = None,
        verbose: bool = False,
        use_strict_trace: bool = True,
    ) -> None:
        """Accepted; trainstream does not show model graphs (one warning)."""
        self._skip("add_graph")

    def add_onnx_graph(self, prototxt: Any = None, *, onnx_model_file: Any = None) -> None:
        """Accepted; not shown (one warning). ``onnx_model_file``: tensorboardX's name."""
        self._skip("add_onnx_graph")

    def add_openvino_graph(self, xmlname: Any) -> None:
        """tensorboardX's; accepted, not shown (one warning)."""
        self._skip("add_openvino_graph")

    def add_embedding(
        self,
        mat: Any,
        metadata: Any = None,
        label_img: Any = None,
        global_step: Any = None,
        tag: str = "default",
        metadata_header: Any = None,
    ) -> None:
        """Accepted; trainstream has no projector (one warning)."""
        self._skip("add_embedding")

    def add_mesh(
        self,
        tag: str,
        vertices: Any,
        colors: Any = None,
        faces: Any = None,
        config_dict: Any = None,
        global_step: Any = None,
        walltime: float | None = None,
    ) -> None:
        """Accepted; meshes are not shown (one warning)."""
        self._skip("add_mesh")

    def add_video(
        self,
        tag: str,
        vid_tensor: Any,
        global_step: Any = None,
        fps: Any = 4,
        walltime: float | None = None,
        *,
        dataformats: str = "NTCHW",
    ) -> None:
        """Accepted; videos are not stored (one warning)."""
        self._skip("add_video")

    def add_audio(
        self,
        tag: str,
        snd_tensor: Any,
        global_step: Any = None,
        sample_rate: int = 44100,
        walltime: float | None = None,
    ) -> None:
        """Accepted; audio is not stored (one warning)."""
        self._skip("add_audio")

    def add_tensor(
        self, tag: str, tensor: Any, global_step: Any = None, walltime: float | None = None
    ) -> None:
        """Accepted; raw tensors are not stored (one warning)."""
        self._skip("add_tensor")

    def export_scalars_to_json(self, path: str) -> None:
        """tensorboardX's; accepted, nothing written (one warning): scalars are on the server."""
        self._skip("export_scalars_to_json")

    def get_logdir(self) -> str:
        """The ``log_dir`` (torch's default ``runs/DATE_HOST``+``comment`` when not given)."""
        return str(self.log_dir)

    def _get_file_writer(self) -> FileWriter:
        return self.file_writer

    # Inside

    def _media_step(self, kind: str, tag: str, global_step: Any) -> tuple[str, int]:
        self._check_open()
        name = self._name(tag)
        return name, self._step(self.run_name, f"{kind}\n{name}", global_step)

    def _image(self, tag: str, image: Any, global_step: Any, walltime: float | None) -> None:
        name, step = self._media_step("image", tag, global_step)
        png, width, height, scaled = _media.fit_png(image)
        if scaled and f"scaled\n{name}" not in self._warned:
            self._warned.add(f"scaled\n{name}")
            warnings.warn(
                f"SummaryWriter: image {tag!r} of {image.shape[1]}x{image.shape[0]} pixels "
                f"is over the media event limit; stored scaled to {width}x{height} "
                "(said once per tag)",
                stacklevel=4,
            )
        event = _media.image_event(self.run_name, name, step, png, width, height, walltime)
        self._main._enqueue([event])

    def _skip(self, method: str) -> None:
        """One warning per method and writer: accepted, nothing stored."""
        self._check_open()
        if method in self._warned:
            return
        self._warned.add(method)
        warnings.warn(
            f"SummaryWriter.{method}: trainstream does not store this; the call is "
            f"accepted and skipped (said once per writer)",
            stacklevel=3,
        )
