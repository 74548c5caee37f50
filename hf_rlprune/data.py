"""Datasets for the two tasks (CIFAR-10 images, IMDB reviews): loading, the reward split, fast tensors, collators.

Both tasks load from the Hub by default (``uoft-cs/cifar10``, ``stanfordnlp/imdb``) and from local copies in the Hub's
parquet layout, e.g. ``load_task_dataset("cifar10", "../shared/data/cifar10")``.

CIFAR-10 is decoded once into a uint8 tensor (N, 3, 32, 32); augmentation (random crop with zero padding, horizontal
flip) and normalisation then run batched in torch inside :class:`ImageCollator`, so the Trainer's data path holds no
per-image PIL work. IMDB is tokenized with a word-level tokenizer (see :mod:`hf_rlprune.tokenization`) and padded
per batch by ``DataCollatorWithPadding``.

The synthetic datasets (:func:`make_synthetic_cifar`, :func:`make_synthetic_imdb`) have the real datasets' columns and
features and learnable structure; the tests and the ``--smoke`` run use them instead of downloading.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset, load_from_disk

from .atomic import atomic_write

logger = logging.getLogger(__name__)

CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMDB_LABELS = ("neg", "pos")

# Per-channel mean and std of the 50,000 CIFAR-10 training images, pixels scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and which columns hold its inputs and labels."""

    name: str
    hub_id: str
    modality: str  # "image" or "text"
    input_column: str
    label_column: str
    label_names: tuple[str, ...]
    # Other names for the input column that are renamed to `input_column` on load (only when `input_column` is absent).
    input_column_aliases: tuple[str, ...] = field(default=())

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


TASKS: dict[str, TaskSpec] = {
    "cifar10": TaskSpec(
        name="cifar10",
        hub_id="uoft-cs/cifar10",
        modality="image",
        input_column="img",
        label_column="label",
        label_names=CIFAR10_LABELS,
        # `image` is what `imagefolder` and most Hub image-classification datasets call it; the feature type is checked.
        input_column_aliases=("image",),
    ),
    "imdb": TaskSpec(
        name="imdb",
        hub_id="stanfordnlp/imdb",
        modality="text",
        input_column="text",
        label_column="label",
        label_names=IMDB_LABELS,
    ),
}

_REQUIRED_SPLITS = ("train", "test")


def get_task_spec(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of `task`; ValueError naming the known tasks if it is unknown."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; known tasks: {sorted(TASKS)}.")
    return TASKS[task]


# ----------------------------------------------------------------------------------------------------------- loading


def load_task_dataset(
    task: str,
    dataset_name_or_path: str | os.PathLike | Mapping[str, str | Sequence[str]] | DatasetDict | None = None,
    input_column: str | None = None,
    label_column: str | None = None,
    **load_kwargs,
) -> DatasetDict:
    """Load a task's "train" and "test" splits and check their columns.

    Args:
        task: "cifar10" or "imdb" (see `TASKS`).
        dataset_name_or_path: where the data is. One of
            - None: the task's Hub id (`uoft-cs/cifar10`, `stanfordnlp/imdb`);
            - a Hub id such as "uoft-cs/cifar10";
            - a local dataset folder that `datasets.load_dataset` reads, e.g. the Hub parquet layout
              `../shared/data/cifar10/{README.md, plain_text/train-00000-of-00001.parquet, ...}`, or a folder written by
              `DatasetDict.save_to_disk`;
            - a dict of parquet files per split, e.g. {"train": "a/train.parquet", "test": ["t0.parquet", ...]};
            - a `DatasetDict` already in memory (only checked).
        input_column, label_column: the data's columns of images (reviews) and class ids, when they are named otherwise
            than the task's (`img` / `text`, `label`); renamed to those.
        **load_kwargs: passed to `datasets.load_dataset` (e.g. `cache_dir`, `revision`, `num_proc`).

    Returns:
        A `DatasetDict` with exactly "train" and "test" (other splits such as IMDB's "unsupervised" are dropped). For
        cifar10 an image column named `image` is renamed to `img`; nothing else is renamed. Ids of a ClassLabel that
        names the task's classes in another order are renumbered to the task's order.
    """
    spec = get_task_spec(task)
    source = spec.hub_id if dataset_name_or_path is None else dataset_name_or_path
    if isinstance(source, DatasetDict):
        loaded = source
    elif isinstance(source, Mapping):
        loaded = _load_parquet_files(spec, source, load_kwargs)
    else:
        loaded = _load_path_or_hub_id(spec, os.fspath(source), load_kwargs)

    if not isinstance(loaded, DatasetDict):
        raise ValueError(f"Expected a DatasetDict with splits {list(_REQUIRED_SPLITS)} for {task!r}, got {type(loaded).__name__}.")
    missing_splits = [split for split in _REQUIRED_SPLITS if split not in loaded]
    if missing_splits:
        raise ValueError(
            f"The {task} data lacks split(s) {missing_splits}; found splits {list(loaded)}. Name the parquet files "
            f"`train-*.parquet` and `test-*.parquet`, or pass a dict {{'train': ..., 'test': ...}} of files."
        )
    renames = {given: wanted for given, wanted in ((input_column, spec.input_column), (label_column, spec.label_column))
               if given is not None and given != wanted}
    for split in _REQUIRED_SPLITS:
        absent = [given for given in renames if given not in loaded[split].column_names]
        if absent:
            raise ValueError(f"The {task} {split!r} split has no column(s) {absent} to use; its columns are "
                             f"{loaded[split].column_names}.")
    return DatasetDict({split: check_task_columns(loaded[split].rename_columns(renames), task, split=split) for split in _REQUIRED_SPLITS})


def _load_parquet_files(spec: TaskSpec, data_files: Mapping, load_kwargs: dict) -> DatasetDict:
    missing_splits = [split for split in _REQUIRED_SPLITS if split not in data_files]
    if missing_splits:
        raise ValueError(
            f"The dict of parquet files for {spec.name} lacks split(s) {missing_splits}; it has {list(data_files)}. "
            f"Pass {{'train': <file or files>, 'test': <file or files>}}."
        )
    files = {
        split: [os.fspath(f) for f in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        for split, paths in data_files.items()
    }
    for path in (p for paths in files.values() for p in paths):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Parquet file {path!r} (given for {spec.name}) does not exist.")
    return load_dataset("parquet", data_files=files, **load_kwargs)


def _load_path_or_hub_id(spec: TaskSpec, source: str, load_kwargs: dict) -> DatasetDict:
    local = os.path.expanduser(source)
    if os.path.isfile(local):
        raise ValueError(
            f"{source!r} is a single file; pass a folder (Hub parquet layout) or a dict "
            f"{{'train': 'train.parquet', 'test': 'test.parquet'}} of parquet files."
        )
    if os.path.isdir(local):
        saved_to_disk = os.path.isfile(os.path.join(local, "dataset_dict.json"))  # a DatasetDict.save_to_disk folder
        try:
            return load_from_disk(local) if saved_to_disk else load_dataset(local, **load_kwargs)
        except (ValueError, IndexError) as err:  # a split of no rows: "Instruction 'test' corresponds to no data!" from
            # load_dataset, an IndexError from load_from_disk
            raise ValueError(
                f"Could not load the folder {source!r} as {spec.name} data ({err}). It must hold non-empty train and test "
                "splits: the Hub parquet layout (train-*.parquet, test-*.parquet) or a DatasetDict.save_to_disk folder."
            ) from err
    # "org/name" is a Hub id, but "./x", "../x", "/x", "~/x" can only be meant as local folders.
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1:
        raise FileNotFoundError(f"Local dataset folder {source!r} does not exist (relative paths start at {os.getcwd()}).")
    try:
        return load_dataset(source, **load_kwargs)
    except ConnectionError as err:
        raise ConnectionError(
            f"Could not load {source!r} from the Hub ({err})"
            + (f", and no local folder {source!r} exists under {os.getcwd()}" if source != spec.hub_id else "")
            + f". Without network access, pass a local copy in the Hub "
            f"parquet layout, e.g. load_task_dataset({spec.name!r}, '../shared/data/{spec.name}'), or a dict of parquet "
            f"files {{'train': ..., 'test': ...}}."
        ) from err


def check_task_columns(dataset: Dataset, task: str, split: str = "train") -> Dataset:
    """Check that `dataset` has the task's input and label columns with usable types; rename a known alias.

    Returns the dataset (renamed if an alias was used; its ids renumbered to the task's order when its ClassLabel
    names the task's classes in another order). Raises ValueError naming what is missing or wrong, the columns found,
    and how to fix it: an empty split, rows without a label (or review), ids outside the task's classes, other class
    names. Reads the label column (and a text task's reviews) once, decoding no image.
    """
    spec = get_task_spec(task)
    columns = list(dataset.column_names)
    if spec.input_column not in columns:
        alias = next((a for a in spec.input_column_aliases if a in columns), None)
        if alias is not None and (spec.modality != "image" or isinstance(dataset.features[alias], Image)):
            dataset = dataset.rename_column(alias, spec.input_column)
            columns = list(dataset.column_names)
    missing = [c for c in (spec.input_column, spec.label_column) if c not in columns]
    if missing:
        what = "an Image column of 32x32 RGB pictures" if spec.modality == "image" else "a string column of reviews"
        raise ValueError(
            f"The {task} {split!r} split lacks column(s) {missing}; found columns {columns}. The {task} task expects "
            f"{spec.input_column!r} ({what}) and {spec.label_column!r} (class ids 0..{spec.num_labels - 1}), as in the "
            f"Hub dataset {spec.hub_id}. Fix: name your columns (load_task_dataset(..., input_column=..., label_column=...); "
            f"scripts/prune.py --input_column / --label_column), or pass data with the {spec.hub_id} layout."
        )

    input_feature = dataset.features[spec.input_column]
    if spec.modality == "image" and not isinstance(input_feature, Image):
        raise ValueError(
            f"Column {spec.input_column!r} of the {task} {split!r} split is {input_feature}, not an Image feature. "
            f"Fix: dataset.cast_column({spec.input_column!r}, datasets.Image()) (it holds encoded image bytes or paths)."
        )
    if spec.modality == "text" and not (isinstance(input_feature, Value) and input_feature.dtype in ("string", "large_string")):
        raise ValueError(f"Column {spec.input_column!r} of the {task} {split!r} split is {input_feature}, not a string column.")

    label_feature = dataset.features[spec.label_column]
    is_integer = isinstance(label_feature, ClassLabel) or (
        isinstance(label_feature, Value) and label_feature.dtype.startswith(("int", "uint"))
    )
    if not is_integer:
        raise ValueError(
            f"Column {spec.label_column!r} of the {task} {split!r} split is {label_feature}; it must hold integer class ids "
            f"0..{spec.num_labels - 1}. Fix: dataset.cast_column({spec.label_column!r}, "
            f"datasets.ClassLabel(names={list(spec.label_names)})) after mapping names to ids."
        )
    if len(dataset) == 0:
        raise ValueError(f"The {task} {split!r} split has no rows; give it labelled examples.")
    arrow = dataset.with_format("arrow")  # honours select()/filter() indices, and reads columns without decoding anything
    checked = [(spec.label_column, "label")] + ([(spec.input_column, "review")] if spec.modality == "text" else [])
    for column, what in checked:  # (an image column is not read here: that would copy every image's bytes)
        missing = arrow[column].null_count
        if missing:
            raise ValueError(
                f"{missing} row(s) of the {task} {split!r} split have no {what} (null in column {column!r}; an empty "
                f"field of a CSV file reads as null). Drop them first, e.g. dataset.filter(lambda row: row[{column!r}] is not None)."
            )
    low_high = pc.min_max(arrow[spec.label_column])
    low, high = low_high["min"].as_py(), low_high["max"].as_py()
    if low is None or low < 0 or high >= spec.num_labels:
        raise ValueError(
            f"Labels of the {task} {split!r} split range over [{low}, {high}] but must lie in [0, {spec.num_labels - 1}] "
            f"({list(spec.label_names)}). Unlabelled rows (label -1, e.g. IMDB's 'unsupervised' split) must be filtered out."
        )
    if isinstance(label_feature, ClassLabel) and list(label_feature.names) != list(spec.label_names):
        # the names say what each id means: the same classes in another order are renumbered; other classes refused
        if sorted(name.lower() for name in label_feature.names) != sorted(name.lower() for name in spec.label_names):
            raise ValueError(
                f"The {task} {split!r} split's {spec.label_column!r} column names the classes {list(label_feature.names)}, "
                f"but the {task} task's model predicts {list(spec.label_names)}. Pass {task} data, or relabel yours to "
                "those classes."
            )
        logger.info("The %s %r split numbers its classes %s; renumbered as %s.", task, split, label_feature.names, spec.label_names)
        dataset = dataset.align_labels_with_mapping({name: index for index, name in enumerate(spec.label_names)}, spec.label_column)
    return dataset


# ------------------------------------------------------------------------------------------------------ reward split


def split_reward_indices(
    labels: Sequence[int] | np.ndarray | torch.Tensor | None, num_rows: int, reward_size: int | float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train_indices, reward_indices) that split `num_rows` rows in two, seeded and disjoint.

    `reward_size` is a fraction in (0, 1) of the rows or an int count in [1, num_rows - 1]. With `labels`, the split is
    stratified: each class gives the reward part its share (largest remainder), so class proportions match.
    Train indices come back sorted; reward indices in a seeded random order, so any prefix of the reward part is
    itself a random sample (IMDB, for one, is stored sorted by label).
    """
    reward_count = _reward_count(reward_size, num_rows)
    rng = np.random.default_rng(seed)
    if labels is None:
        reward_indices = rng.permutation(num_rows)[:reward_count]
    else:
        labels = np.asarray(labels)
        if labels.shape != (num_rows,):
            raise ValueError(f"labels has shape {labels.shape}, expected ({num_rows},).")
        classes, inverse, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
        # Largest-remainder apportionment: sums to exactly reward_count and never exceeds a class's size.
        quotas = class_counts * reward_count / num_rows
        per_class = np.floor(quotas).astype(np.int64)
        shortfall = reward_count - int(per_class.sum())
        per_class[np.argsort(-(quotas - per_class), kind="stable")[:shortfall]] += 1
        picked = []
        for class_index in range(len(classes)):
            members = np.flatnonzero(inverse == class_index)
            picked.append(rng.permutation(members)[: per_class[class_index]])
        reward_indices = rng.permutation(np.concatenate(picked))
    in_reward = np.zeros(num_rows, dtype=bool)
    in_reward[reward_indices] = True
    return np.flatnonzero(~in_reward), reward_indices.astype(np.int64)


def split_reward(
    train_dataset: Dataset, reward_size: int | float, seed: int, label_column: str | None = "label"
) -> tuple[Dataset, Dataset]:
    """Split the training set into (train_part, reward_part): disjoint rows, seeded, stratified by `label_column`.

    The reward part is the held-out data the pruning agent's reward is measured on; the test split is never involved.
    `reward_size` is a fraction in (0, 1) or an int count in [1, len - 1]. Pass `label_column=None` (or a dataset
    without that column) for a plain random split.
    """
    labels = None
    if label_column is not None and label_column in train_dataset.column_names:
        labels = train_dataset.with_format("arrow")[label_column].to_numpy()
    train_indices, reward_indices = split_reward_indices(labels, len(train_dataset), reward_size, seed)
    return train_dataset.select(train_indices), train_dataset.select(reward_indices)


def _reward_count(reward_size: int | float, num_rows: int) -> int:
    if isinstance(reward_size, bool) or not isinstance(reward_size, (int, float, np.integer, np.floating)):
        raise TypeError(f"reward_size must be a fraction in (0, 1) or an int count, got {reward_size!r}.")
    if num_rows < 2:
        raise ValueError(f"Cannot split {num_rows} row(s) into a train part and a reward part; both need at least one row.")
    if isinstance(reward_size, (float, np.floating)):
        if not 0.0 < reward_size < 1.0:
            raise ValueError(f"reward_size = {reward_size} as a float must be a fraction in (0, 1); for a count pass an int.")
        count = int(round(reward_size * num_rows))
        if not 1 <= count <= num_rows - 1:
            raise ValueError(
                f"reward_size = {reward_size} of {num_rows} rows gives {count} reward rows; both parts need at least one row."
            )
        return count
    if not 1 <= reward_size <= num_rows - 1:
        raise ValueError(f"reward_size = {reward_size} rows is out of range; it must lie in [1, {num_rows - 1}] for {num_rows} rows.")
    return int(reward_size)


# ------------------------------------------------------------------------------------------------ images as tensors


def images_to_tensor(
    dataset: Dataset,
    image_column: str = "img",
    label_column: str = "label",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of `dataset` once: (images uint8 (N, 3, H, W), labels int64 (N,)).

    Reads the encoded bytes straight from Arrow (no per-row `datasets` decoding) and decodes them with PIL, converting
    to RGB. All images must share one size. With `cache_dir`, the result is stored there as safetensors keyed by the
    dataset's fingerprint, so a later run loads it instead of decoding again.
    """
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(f"Column {column!r} not in the dataset (columns: {dataset.column_names}).")
    if not isinstance(dataset.features[image_column], Image):
        raise ValueError(
            f"Column {image_column!r} is {dataset.features[image_column]}, not an Image feature; "
            f"cast it with dataset.cast_column({image_column!r}, datasets.Image())."
        )
    if len(dataset) == 0:
        raise ValueError("The dataset has no rows; there are no images to decode.")

    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"decoded-{dataset._fingerprint}-{image_column}-{label_column}-{len(dataset)}.safetensors"
        if cache_path.is_file():
            from safetensors.torch import load_file

            cached = load_file(cache_path)
            return cached["images"], cached["labels"]

    # Arrow format skips feature decoding and applies any select()/shuffle() indices.
    table = dataset.select_columns([image_column, label_column]).with_format("arrow")[:]
    images = _decode_image_structs(table.column(image_column))  # (N, 3, H, W)
    labels = torch.from_numpy(table.column(label_column).to_numpy().astype(np.int64))  # (N,)

    if cache_path is not None:
        from safetensors.torch import save_file

        atomic_write(lambda tmp: save_file({"images": images, "labels": labels}, tmp), cache_path)  # readers never see half a file
    return images, labels


def _decode_image_structs(column: pa.ChunkedArray) -> torch.Tensor:
    import PIL.Image

    structs = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    encoded = structs.field("bytes").to_pylist()
    paths = structs.field("path").to_pylist()
    first_size = None
    pixel_chunks = []
    for row, (data, path) in enumerate(zip(encoded, paths)):
        if data is None and path is None:
            raise ValueError(f"Image row {row} has neither bytes nor a path.")
        with PIL.Image.open(io.BytesIO(data) if data is not None else path) as image:
            if image.mode != "RGB":
                image = image.convert("RGB")
            if first_size is None:
                first_size = image.size
            elif image.size != first_size:
                raise ValueError(
                    f"Image row {row} is {image.size[0]}x{image.size[1]} but row 0 is {first_size[0]}x{first_size[1]}; "
                    "resize the images to one size first."
                )
            pixel_chunks.append(image.tobytes())  # H*W*3 bytes, row-major RGB
    width, height = first_size
    pixels = np.frombuffer(b"".join(pixel_chunks), dtype=np.uint8).reshape(len(pixel_chunks), height, width, 3)
    return torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


class CachedImageDataset(torch.utils.data.Dataset):
    """Decoded images as a torch Dataset: item i is {"pixel_values": uint8 (3, H, W), "labels": int}.

    Pair it with :class:`ImageCollator`, which augments and normalises whole batches.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}.")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}.")
        self.images = images  # (N, 3, H, W) uint8
        self.labels = labels.long()  # (N,)

    @classmethod
    def from_dataset(
        cls, dataset: Dataset, image_column: str = "img", label_column: str = "label", cache_dir: str | os.PathLike | None = None
    ) -> "CachedImageDataset":
        return cls(*images_to_tensor(dataset, image_column, label_column, cache_dir))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.images[index], "labels": int(self.labels[index])}


# ------------------------------------------------------------------------------------- augmentation and normalisation


def normalize_images(images: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 (x / 255 - mean) / std, on the images' device.

    Matches `make_image_processor()` (rescale by 1/255, then normalise) on the same pixels.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects uint8 pixels in [0, 255], got {images.dtype}; decode with images_to_tensor().")
    mean_tensor = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)  # (3, 1, 1)
    std_tensor = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.float() / 255 - mean_tensor) / std_tensor


def crop_flip(
    images: torch.Tensor, offsets_y: torch.Tensor, offsets_x: torch.Tensor, flip_mask: torch.Tensor | None, pad: int
) -> torch.Tensor:
    """Zero-pad each image by `pad`, crop H x W at (offsets_y[b], offsets_x[b]), mirror where flip_mask[b]; batched.

    images (B, C, H, W) of any dtype; offsets in [0, 2 * pad]; one gather, no per-image loop.
    """
    batch, channels, height, width = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad)) if pad > 0 else images  # (B, C, H + 2p, W + 2p)
    padded_width = width + 2 * pad
    rows = offsets_y.to(device).view(batch, 1) + torch.arange(height, device=device)  # (B, H)
    cols = offsets_x.to(device).view(batch, 1) + torch.arange(width, device=device)  # (B, W)
    if flip_mask is not None:
        # Mirroring the crop is reading its columns right to left.
        cols = torch.where(flip_mask.to(device).view(batch, 1), cols.flip(1), cols)
    # Flat pixel index into each padded plane; one gather is several times faster than multi-dim advanced indexing.
    flat_index = rows.view(batch, 1, height, 1) * padded_width + cols.view(batch, 1, 1, width)  # (B, 1, H, W)
    flat_index = flat_index.expand(batch, channels, height, width).reshape(batch, channels, height * width)
    cropped = padded.reshape(batch, channels, -1).gather(2, flat_index)  # (B, C, H * W)
    return cropped.view(batch, channels, height, width)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding `pad` and random horizontal flip (p = 0.5) of a batch (B, C, H, W).

    The random numbers come from `generator` (or torch's global RNG) on its own device, so results for a seed do not
    depend on where the images live.
    """
    if pad < 0:
        raise ValueError(f"pad = {pad} must be >= 0.")
    batch = images.shape[0]
    rng_device = generator.device if generator is not None else torch.device("cpu")
    offsets_y = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=rng_device)
    offsets_x = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=rng_device)
    flip_mask = torch.rand(batch, generator=generator, device=rng_device) < 0.5 if flip else None
    return crop_flip(images, offsets_y, offsets_x, flip_mask, pad)


class ImageCollator:
    """Stack {"pixel_values": uint8 (3, H, W), "labels"} items, augment (train only) and normalise in one batched pass.

    Returns {"pixel_values": float32 (B, 3, H, W), "labels": int64 (B,)}. With `train=False` it only normalises, which
    equals `normalize_images` and `make_image_processor()`.

    `seed=None` draws from torch's global RNG, which `transformers.set_seed` seeds and DataLoader workers re-seed per
    worker and epoch. An int `seed` uses a private generator: the same seed gives the same augmentations for the same
    sequence of batches; inside a DataLoader worker it is mixed with the worker's seed so workers differ.
    """

    def __init__(
        self,
        train: bool,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        pad: int = 4,
        flip: bool = True,
        seed: int | None = None,
    ):
        if pad < 0:
            raise ValueError(f"pad = {pad} must be >= 0.")
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} values but std has {len(std)}; give one per channel.")
        self.train = train
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.pad = pad
        self.flip = flip
        self.seed = seed
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)
        self._worker_seed = None  # the DataLoader worker seed the generator was last keyed to

    def _current_generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        worker = torch.utils.data.get_worker_info()
        worker_seed = None if worker is None else worker.seed
        if worker_seed != self._worker_seed:
            # Each worker holds a copy of this collator; without re-keying they would all draw the same numbers.
            self._generator = torch.Generator().manual_seed((self.seed * 1_000_003 + worker_seed) % (2**63))
            self._worker_seed = worker_seed
        return self._generator

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([torch.as_tensor(item["pixel_values"]) for item in features])  # (B, 3, H, W) uint8
        label_key = "labels" if "labels" in features[0] else "label"
        labels = torch.tensor([int(item[label_key]) for item in features], dtype=torch.long)  # (B,)
        if self.train:
            pixel_values = random_crop_flip(pixel_values, self._current_generator(), self.pad, self.flip)
        return {"pixel_values": normalize_images(pixel_values, self.mean, self.std), "labels": labels}


def make_image_processor(mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD, image_size: int = 32):
    """A transformers image processor that preprocesses exactly like evaluation here (`normalize_images`).

    Converts to RGB, resizes to `image_size` x `image_size` (bilinear; a no-op for 32x32 CIFAR images, so their pixels
    are untouched), rescales by 1/255 and normalises with `mean`/`std`. Save it beside a model with
    `save_pretrained(dir)`; `AutoImageProcessor.from_pretrained(dir)` and `pipeline("image-classification")` load it.
    It needs no torchvision: the PIL backend is used (where torchvision exists, Auto* may pick the torchvision backend,
    which agrees to float rounding).
    """
    import PIL.Image

    try:  # transformers >= 5.x ships a PIL backend; importing it directly avoids the "requires torchvision" fallback warning
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil as processor_class
    except ImportError:
        from transformers import ViTImageProcessor as processor_class
    return processor_class(
        do_convert_rgb=True,
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=PIL.Image.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
    )


# ---------------------------------------------------------------------------------------------------------- text


def tokenize_dataset(
    dataset: Dataset, tokenizer, max_length: int | None = None, text_column: str = "text", num_proc: int | None = None
) -> Dataset:
    """Tokenize `text_column` in batches: truncation to `max_length` (default: tokenizer.model_max_length), no padding.

    Returns the dataset with `input_ids` and `attention_mask` in place of the text column (other columns, e.g. the
    label, are kept). A text with no tokens at all gets one `[UNK]`: the LSTM needs at least one real token per row.
    Pad per batch with :func:`make_text_collator`.
    """
    if text_column not in dataset.column_names:
        raise ValueError(f"Column {text_column!r} not in the dataset (columns: {dataset.column_names}).")
    if max_length is None:
        max_length = tokenizer.model_max_length
    if not isinstance(max_length, int) or not 1 <= max_length <= 1_000_000:
        raise ValueError(
            f"max_length = {max_length!r} must be a positive int; pass max_length= (the tokenizer gives no usable "
            "model_max_length)."
        )
    unk_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id

    def tokenize_batch(batch: dict) -> dict:
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_length, padding=False)
        input_ids = [ids if ids else [unk_id] for ids in encoded["input_ids"]]
        return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids]}

    return dataset.map(tokenize_batch, batched=True, remove_columns=[text_column], num_proc=num_proc, desc="Tokenizing")


def make_text_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """Per-batch right padding with the tokenizer's pad id; renames `label` to `labels` (`DataCollatorWithPadding`)."""
    from transformers import DataCollatorWithPadding

    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token (train_word_tokenizer sets '[PAD]').")
    if tokenizer.padding_side != "right":
        raise ValueError(f"tokenizer.padding_side is {tokenizer.padding_side!r}; the LSTM reads left to right and needs 'right'.")
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")


def tokenized_to_tensors(tokenized: Dataset, pad_token_id: int, label_column: str = "label") -> dict[str, torch.Tensor]:
    """A tokenized dataset as right-padded tensors: input_ids (N, T) int64, attention_mask (N, T) int64, labels (N,).

    T is the longest row. Built from the Arrow offsets in one scatter, for an evaluator that keeps everything on the
    device (`{k: v.to(device) for k, v in ...items()}`).
    """
    table = tokenized.select_columns(["input_ids", label_column]).with_format("arrow")[:]
    token_lists = table.column("input_ids").combine_chunks()
    offsets = token_lists.offsets.to_numpy()
    lengths = np.diff(offsets)  # (N,)
    flat_ids = token_lists.flatten().to_numpy()  # (sum of lengths,)
    longest = int(lengths.max()) if len(lengths) else 0
    attention_mask = np.arange(longest)[None, :] < lengths[:, None]  # (N, T) bool
    input_ids = np.full((len(lengths), longest), pad_token_id, dtype=np.int64)
    input_ids[attention_mask] = flat_ids  # row-major order of the mask is the order of the flat ids
    labels = table.column(label_column).to_numpy().astype(np.int64)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask.astype(np.int64)),
        "labels": torch.from_numpy(labels),
    }


# ------------------------------------------------------------------------------------------------- synthetic data

# Each class tints the grey 128 by 20 levels along its own RGB direction; under the per-image brightness and pixel
# noise below, colour alone is ambiguous and the stripe texture has to be read too (a small CNN needs a few epochs).
_SYNTHETIC_CLASS_DIRECTIONS = np.array(
    [[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1],
     [-1, 1, 1], [1, 0, -1], [0, 0, 0], [-1, 0, 1], [0, -1, -1]],
    dtype=np.float32,
)
_SYNTHETIC_CLASS_COLOURS = 128 + 20 * _SYNTHETIC_CLASS_DIRECTIONS  # (10, 3)


def _synthetic_cifar_split(num_rows: int, rng: np.random.Generator, image_size: int = 32) -> Dataset:
    import PIL.Image

    labels = rng.integers(0, len(CIFAR10_LABELS), size=num_rows)  # (N,)
    grid = np.arange(image_size, dtype=np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(num_rows, 1, 1)).astype(np.float32)
    period = (3 + labels // 2).astype(np.float32)[:, None, None]  # 3..7 pixels: the texture scale tells class pairs apart
    vertical = (labels % 2 == 1)[:, None, None]  # stripe direction tells the two classes of a pair apart
    coordinate = np.where(vertical, grid[None, None, :], grid[None, :, None])  # (N, H, W)
    stripes = 30.0 * np.sin(2 * np.pi * coordinate / period + phase)  # (N, H, W)
    brightness = rng.normal(0, 20, size=(num_rows, 1, 1, 1)).astype(np.float32)
    noise = rng.normal(0, 70, size=(num_rows, image_size, image_size, 3)).astype(np.float32)
    pixels = _SYNTHETIC_CLASS_COLOURS[labels][:, None, None, :] + stripes[..., None] + brightness + noise  # (N, H, W, 3)
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    encoded = []
    for image in pixels:
        buffer = io.BytesIO()
        PIL.Image.fromarray(image).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = Features({"img": Image(), "label": ClassLabel(names=list(CIFAR10_LABELS))})
    return Dataset.from_dict({"img": encoded, "label": labels.tolist()}, features=features)


def make_synthetic_cifar(num_train: int = 2000, num_test: int = 500, seed: int = 0) -> DatasetDict:
    """A CIFAR-10 look-alike: 32x32 RGB PNGs in an `img` Image column and a `label` ClassLabel of the 10 CIFAR names.

    Each class has its own colour and stripe texture (direction and period) under per-image brightness, phase and
    pixel noise, so a small CNN learns it well above chance within a few epochs; crops and flips keep the class.
    """
    _check_sizes(num_train, num_test)
    rng = np.random.default_rng(seed)
    return DatasetDict({"train": _synthetic_cifar_split(num_train, rng), "test": _synthetic_cifar_split(num_test, rng)})


_NEUTRAL_WORDS = (
    "the a an this that movie film story plot actor actress director scene scenes character characters script "
    "camera music ending beginning time people life man woman family friend house night city world year "
    "was is were are be been has have had it he she they we i you his her their its of in on at to from with "
    "and but or as about after before during while when then there here also just really quite very some "
    "watched saw seen think thought felt found made make see look looked seemed seems show shows role part "
    "first second last long short old new young big small whole own other another same"
).split()
_POSITIVE_WORDS = (
    "great excellent wonderful brilliant superb amazing beautiful fantastic loved enjoyed masterpiece "
    "delightful moving touching perfect charming"
).split()
_NEGATIVE_WORDS = (
    "awful terrible boring dull worst bad horrible waste stupid poorly annoying mess hated disappointing "
    "pointless lame"
).split()


def _synthetic_review(label: int, rng: np.random.Generator) -> str:
    num_words = int(rng.integers(20, 120))
    words = list(rng.choice(_NEUTRAL_WORDS, size=num_words))
    cue_words, counter_words = (_POSITIVE_WORDS, _NEGATIVE_WORDS) if label == 1 else (_NEGATIVE_WORDS, _POSITIVE_WORDS)
    # More cues of the label's polarity than of the other, at random places: the net count decides the label.
    num_cues = int(rng.integers(2, 6))
    num_counter = int(rng.integers(0, num_cues - 1))
    for cue in list(rng.choice(cue_words, size=num_cues)) + list(rng.choice(counter_words, size=num_counter)):
        words.insert(int(rng.integers(0, len(words) + 1)), cue)
    sentences, start = [], 0
    while start < len(words):
        end = start + int(rng.integers(5, 15))
        sentence = " ".join(words[start:end])
        sentences.append(sentence[:1].upper() + sentence[1:] + str(rng.choice([".", ".", "!", ","])))
        start = end
    # Real IMDB reviews keep their HTML line breaks; the tokenizer must cope with them.
    separators = rng.choice([" ", " ", " ", "<br /><br />"], size=len(sentences) - 1)
    return "".join(s + sep for s, sep in zip(sentences, list(separators) + [""]))


def _synthetic_imdb_split(num_rows: int, rng: np.random.Generator) -> Dataset:
    labels = rng.permutation(np.arange(num_rows) % 2)  # balanced like IMDB, in random order
    texts = [_synthetic_review(int(label), rng) for label in labels]
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(IMDB_LABELS))})
    return Dataset.from_dict({"text": texts, "label": labels.tolist()}, features=features)


def make_synthetic_imdb(num_train: int = 2000, num_test: int = 500, seed: int = 0) -> DatasetDict:
    """An IMDB look-alike: English-like reviews in `text` and a `label` ClassLabel ["neg", "pos"], balanced.

    Reviews mix neutral words with positive and negative cue words; the label's polarity always has more cues, so an
    LSTM (or a bag of words) learns it. Texts carry `<br /><br />` breaks and punctuation like the real reviews.
    """
    _check_sizes(num_train, num_test)
    rng = np.random.default_rng(seed)
    return DatasetDict({"train": _synthetic_imdb_split(num_train, rng), "test": _synthetic_imdb_split(num_test, rng)})


def _check_sizes(num_train: int, num_test: int) -> None:
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} = {value!r} must be a positive int.")
