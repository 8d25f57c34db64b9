"""Procedurally generated geometric-shapes datasets, exposed as offline TFDS builders."""

import struct
import zlib
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32


def _radius(u, v):
    return np.sqrt(u * u + v * v)


def _box(u, v):
    return np.maximum(np.abs(u), np.abs(v))


# Each class is one inequality on coordinates (u, v) normalized so the shape's half-extent is 1,
# given the stroke width w in the same units. Keeping names and drawing together keeps them in sync.
_SHAPES = (
    ("circle", lambda u, v, w: _radius(u, v) <= 1.0),
    ("ring", lambda u, v, w: (_radius(u, v) <= 1.0) & (_radius(u, v) >= 1.0 - w)),
    ("square", lambda u, v, w: _box(u, v) <= 0.85),
    ("hollow_square", lambda u, v, w: (_box(u, v) <= 0.85) & (_box(u, v) >= 0.85 - w)),
    ("triangle", lambda u, v, w: (v >= -0.85) & (v <= 0.85) & (np.abs(u) <= (v + 0.85) * 0.55)),
    ("plus", lambda u, v, w: ((np.abs(u) <= w / 2) | (np.abs(v) <= w / 2)) & (_box(u, v) <= 1.0)),
    (
        "x_cross",
        lambda u, v, w: (
            ((np.abs(u - v) <= w * 0.7) | (np.abs(u + v) <= w * 0.7)) & (_box(u, v) <= 0.85)
        ),
    ),
    ("diamond", lambda u, v, w: np.abs(u) + np.abs(v) <= 1.0),
    ("horizontal_bar", lambda u, v, w: (np.abs(v) <= w * 0.75) & (np.abs(u) <= 1.0)),
    ("vertical_bar", lambda u, v, w: (np.abs(u) <= w * 0.75) & (np.abs(v) <= 1.0)),
)
CLASS_NAMES = tuple(name for name, _ in _SHAPES)
# Split sizes and seeds are part of the dataset's identity: changing either changes the bytes, so
# bump VERSION with them.
SPLITS = {"train": (12_000, 20_240_001), "test": (2_000, 20_240_002)}

# Examples are rendered in chunks so memory stays bounded while numpy still vectorizes the work.
_CHUNK = 2_000
# Minimum Euclidean RGB distance between foreground and background, so every shape stays visible.
_MIN_CONTRAST = 110.0


def _shape_masks(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return boolean masks (n, H, W) with one randomly placed, sized and stroked shape each."""
    n = labels.shape[0]
    half = rng.uniform(5.0, 13.0, size=n).astype(np.float32)
    # Keep the whole shape inside the canvas so no class is confused with a cropped neighbour.
    cy = rng.uniform(half, IMAGE_SIZE - 1 - half).astype(np.float32)
    cx = rng.uniform(half, IMAGE_SIZE - 1 - half).astype(np.float32)
    # Stroke width in normalized units; at least ~1.5 px so thin strokes survive the noise.
    stroke = np.maximum(rng.uniform(0.2, 0.4, size=n), 1.5 / half).astype(np.float32)

    grid = np.arange(IMAGE_SIZE, dtype=np.float32)
    masks = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for label, (_, draw) in enumerate(_SHAPES):
        sel = labels == label
        v = (grid[None, :, None] - cy[sel, None, None]) / half[sel, None, None]
        u = (grid[None, None, :] - cx[sel, None, None]) / half[sel, None, None]
        masks[sel] = draw(u, v, stroke[sel, None, None])
    return masks


def _contrasting_colors(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample (foreground, background) RGB pairs, resampling pairs that are too similar."""
    fg = rng.uniform(0.0, 255.0, size=(n, 3)).astype(np.float32)
    bg = rng.uniform(0.0, 255.0, size=(n, 3)).astype(np.float32)
    while True:
        # Spelled-out sum: a library reduction's order (and so its rounding) may vary by CPU.
        diff = fg - bg
        weak = diff[:, 0] ** 2 + diff[:, 1] ** 2 + diff[:, 2] ** 2 < _MIN_CONTRAST**2
        if not weak.any():
            return fg, bg
        fg[weak] = rng.uniform(0.0, 255.0, size=(weak.sum(), 3))


def render_examples(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Render (images uint8 (n, 32, 32, 3), labels int64 (n,)) deterministically from seed.

    Labels are a shuffled, exactly balanced sequence so every split has equal class shares. Only
    IEEE-exact float32 operations touch the random draws, and numpy fixes Generator streams per
    release, so a numpy version yields the same pixels on every machine. Public so tests and
    benchmarks can use the same pixels without going through TFDS.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_examples) % len(CLASS_NAMES))
    images = np.empty((num_examples, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for start in range(0, num_examples, _CHUNK):
        chunk = labels[start : start + _CHUNK]
        n = chunk.shape[0]
        mask = _shape_masks(chunk, rng)[..., None]
        fg, bg = _contrasting_colors(n, rng)
        # In-place float32 arithmetic: allocating temporaries dominated generation time.
        pixels = rng.standard_normal(size=(n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
        pixels *= rng.uniform(8.0, 32.0, size=(n, 1, 1, 1)).astype(np.float32)
        pixels += np.where(mask, fg[:, None, None, :], bg[:, None, None, :])
        np.rint(pixels, out=pixels)
        np.clip(pixels, 0.0, 255.0, out=pixels)
        images[start : start + n] = pixels
    return images, labels.astype(np.int64)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(image: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as an RGB PNG with uncompressed (stored) deflate blocks.

    Going through TF's PNG encoder costs an eager op call per image and more than half of the
    preparation time. Pixel noise makes deflate gain under 10% anyway, and stored blocks make the
    bytes independent of the zlib build, so the files are identical on every machine.
    """
    height, width, _ = image.shape
    # Each scanline starts with filter type 0 (None).
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], 1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace.
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 0))
        + _png_chunk(b"IEND", b"")
    )


class TfscaleShapes(tfds.core.GeneratorBasedBuilder):
    """Ten classes of noisy, randomly placed and coloured shapes rendered from a fixed seed.

    It exists so the default training config works with no network: every byte is produced locally
    by numpy, yet the task is hard enough that learning curves are informative.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: 10 shape classes, 32x32x3, 12k train / 2k test.",
    }
    FILE_FORMAT = "tfrecord"  # Fixed-size and small: loaded into memory (sources.py).
    IMAGE_SHAPE: ClassVar[tuple] = (IMAGE_SIZE, IMAGE_SIZE, 3)
    SPLITS: ClassVar[dict[str, tuple[int, int]]] = SPLITS

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=self.IMAGE_SHAPE, encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        """Ignore dl_manager: the data is rendered, never downloaded."""
        del dl_manager
        return {
            name: self._generate_examples(num_examples=num_examples, seed=seed)
            for name, (num_examples, seed) in self.SPLITS.items()
        }

    def _generate_examples(self, num_examples: int, seed: int):
        """Yield examples keyed by index, so TFDS's key-based shuffling is reproducible too."""
        images, labels = render_examples(num_examples, seed)
        for index, image in enumerate(self._sized(images, seed)):
            yield index, {"image": encode_png(image), "label": int(labels[index])}

    def _sized(self, images: np.ndarray, seed: int):
        """The rendered images as stored: here unchanged."""
        del seed
        return images


class TfscaleShapesVariable(TfscaleShapes):
    """The same shapes stretched to random sizes (32 to 96 pixels a side), in ArrayRecord files.

    It stands in for ImageNet offline: variable-size images that cannot be stacked in memory, read
    by index and cropped/resized by the same code path the ResNet-50 config uses.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: 10 shape classes, 32..96 px per side, 4k train / 1k test.",
    }
    FILE_FORMAT = "array_record"  # Variable-size: read by index (sources.py).
    IMAGE_SHAPE: ClassVar[tuple] = (None, None, 3)
    SPLITS: ClassVar[dict[str, tuple[int, int]]] = {
        "train": (4_000, 20_240_011),
        "test": (1_000, 20_240_012),
    }

    def _sized(self, images: np.ndarray, seed: int):
        """Each image stretched to a random size, nearest neighbour by index arrays: integer
        arithmetic only, so the bytes are the same everywhere."""
        sizes = np.random.default_rng(seed).integers(32, 97, size=(len(images), 2))
        for image, (height, width) in zip(images, sizes, strict=True):
            rows = np.arange(height) * IMAGE_SIZE // height
            cols = np.arange(width) * IMAGE_SIZE // width
            yield image[rows[:, None], cols[None, :]]


def load_or_prepare(data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Return the prepared `tfscale_shapes` builder, generating it on first use."""
    return _load_or_prepare(TfscaleShapes, data_dir)


def load_or_prepare_variable(data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Return the prepared `tfscale_shapes_variable` builder, generating it on first use."""
    return _load_or_prepare(TfscaleShapesVariable, data_dir)


def _load_or_prepare(
    builder_class: type[tfds.core.GeneratorBasedBuilder], data_dir: str | None
) -> tfds.core.DatasetBuilder:
    """Return the prepared builder, generating the dataset on first use.

    Preparing lazily is safe because generation is pure local numpy work (a few seconds, no
    downloads, deterministic bytes), so a missing dataset can never stall or diverge a run.
    `data_dir=None` uses TFDS's default data directory.

    Several workers may prepare the same `data_dir` at once (a fresh multi-worker job): TFDS
    writes to a temporary directory and renames it, so all but the first rename fail. The bytes
    are identical whoever wins, so a failed rename next to a finished copy is success.
    """
    builder = builder_class(data_dir=data_dir)  # Prepared: in whatever format is on disk.
    if builder.is_prepared():
        return builder
    builder = builder_class(data_dir=data_dir, file_format=builder_class.FILE_FORMAT)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    except Exception:  # noqa: BLE001 - whatever the race raised, a finished copy settles it.
        builder = builder_class(data_dir=data_dir, file_format=builder_class.FILE_FORMAT)
        if not builder.is_prepared():
            raise
    return builder
