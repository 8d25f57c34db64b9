"""PNG figures for the tools: matplotlib loads only when a picture is drawn (training never
needs it), and the file goes through tf.io.gfile, so a gs:// workdir works like a local one."""

import contextlib
from collections.abc import Iterator

import tensorflow as tf


@contextlib.contextmanager
def png(path: str, figsize: tuple[float, float] = (7, 3.5), rows: int = 1, **subplots) -> Iterator:
    """Yields the axes of a new figure (`rows` stacked; extra `subplots` arguments such as
    sharex go to pyplot.subplots) and writes the figure to `path` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(rows, 1, figsize=figsize, **subplots)
    try:
        yield axes
        figure.tight_layout()
        with tf.io.gfile.GFile(path, "wb") as f:
            figure.savefig(f, format="png", dpi=100)
    finally:
        pyplot.close(figure)
