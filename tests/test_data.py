"""Data loading, the reward split, decoded image tensors, collators, the word tokenizer and the synthetic datasets.

Everything here is built in tmp_path from the synthetic datasets: no Hub, no ../shared/data.
"""

import io

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from transformers import AutoImageProcessor, AutoTokenizer

from hf_rlprune.data import (
    CIFAR10_LABELS,
    CIFAR10_MEAN,
    CIFAR10_STD,
    TASKS,
    CachedImageDataset,
    ImageCollator,
    crop_flip,
    images_to_tensor,
    load_task_dataset,
    make_image_processor,
    make_synthetic_cifar,
    make_synthetic_imdb,
    make_text_collator,
    normalize_images,
    random_crop_flip,
    split_reward,
    split_reward_indices,
    tokenize_dataset,
    tokenized_to_tensors,
)
from hf_rlprune.tokenization import train_word_tokenizer

HUB_README = """---
configs:
- config_name: plain_text
  data_files:
  - split: train
    path: plain_text/train-*
  - split: test
    path: plain_text/test-*
  default: true
---
# test copy in the Hub layout
"""


@pytest.fixture(scope="module")
def synthetic_cifar():
    return make_synthetic_cifar(num_train=60, num_test=20, seed=0)


@pytest.fixture(scope="module")
def synthetic_imdb():
    return make_synthetic_imdb(num_train=60, num_test=20, seed=0)


@pytest.fixture(scope="module")
def imdb_tokenizer(synthetic_imdb):
    return train_word_tokenizer(synthetic_imdb["train"]["text"], vocab_size=500, min_frequency=1, model_max_length=32)


def pil_pixels(dataset, column="img"):
    """Reference decode: datasets' own PIL decoding, row by row. (N, 3, H, W) uint8."""
    return torch.stack([torch.from_numpy(np.array(row[column].convert("RGB"))).permute(2, 0, 1) for row in dataset])


def write_hub_layout(dataset_dict, folder):
    (folder / "plain_text").mkdir(parents=True)
    for split, dataset in dataset_dict.items():
        dataset.to_parquet(folder / "plain_text" / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text(HUB_README)
    return folder


# ------------------------------------------------------------------------------------------------------- loading


def test_load_hub_layout_folder(synthetic_cifar, tmp_path):
    folder = write_hub_layout(synthetic_cifar, tmp_path / "cifar10")
    loaded = load_task_dataset("cifar10", str(folder), cache_dir=str(tmp_path / "cache"))
    assert list(loaded) == ["train", "test"]
    assert loaded["train"].features == synthetic_cifar["train"].features
    assert [len(loaded[s]) for s in ("train", "test")] == [60, 20]
    assert torch.equal(images_to_tensor(loaded["test"])[0], images_to_tensor(synthetic_cifar["test"])[0])


def test_load_plain_parquet_folder(synthetic_imdb, tmp_path):
    # No README: `datasets` infers the splits from the file names.
    folder = tmp_path / "imdb"
    folder.mkdir()
    for split, dataset in synthetic_imdb.items():
        dataset.to_parquet(folder / f"{split}.parquet")
    loaded = load_task_dataset("imdb", folder, cache_dir=str(tmp_path / "cache"))
    assert loaded["train"]["text"][:5] == synthetic_imdb["train"]["text"][:5]
    assert loaded["test"].features["label"].names == ["neg", "pos"]


def test_load_dict_of_parquet_files(synthetic_imdb, tmp_path):
    files = {}
    for split, dataset in synthetic_imdb.items():
        files[split] = str(tmp_path / f"{split}.parquet")
        dataset.to_parquet(files[split])
    loaded = load_task_dataset("imdb", {"train": [files["train"]], "test": files["test"]}, cache_dir=str(tmp_path / "cache"))
    assert len(loaded["train"]) == 60 and len(loaded["test"]) == 20
    with pytest.raises(ValueError, match=r"lacks split\(s\) \['test'\]"):
        load_task_dataset("imdb", {"train": files["train"]})
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_task_dataset("imdb", {"train": files["train"], "test": str(tmp_path / "nope.parquet")})


def test_unknown_task_names_known_tasks():
    with pytest.raises(ValueError, match=r"Unknown task 'mnist'.*\['cifar10', 'imdb'\]"):
        load_task_dataset("mnist")


def test_missing_column_error_names_columns_and_fix(synthetic_imdb):
    renamed = DatasetDict({split: ds.rename_column("text", "review") for split, ds in synthetic_imdb.items()})
    with pytest.raises(ValueError) as info:
        load_task_dataset("imdb", renamed)
    message = str(info.value)
    assert "lacks column(s) ['text']" in message and "found columns ['review', 'label']" in message
    assert "input_column=" in message and "--input_column" in message
    # the fix the message names: the data's own column names (the command line's --input_column / --label_column)
    named = DatasetDict({split: ds.rename_column("label", "sentiment") for split, ds in renamed.items()})
    loaded = load_task_dataset("imdb", named, input_column="review", label_column="sentiment")
    assert loaded["train"].column_names == ["text", "label"] and loaded["train"]["text"] == synthetic_imdb["train"]["text"]
    with pytest.raises(ValueError, match=r"has no column\(s\) \['sentence'\] to use; its columns are \['review', 'sentiment'\]"):
        load_task_dataset("imdb", named, input_column="sentence", label_column="sentiment")


def test_image_alias_is_renamed_and_wrong_types_rejected(synthetic_cifar):
    aliased = DatasetDict({split: ds.rename_column("img", "image") for split, ds in synthetic_cifar.items()})
    assert load_task_dataset("cifar10", aliased)["train"].column_names == ["img", "label"]
    as_strings = DatasetDict({split: Dataset.from_dict({"img": ["x"], "label": [0]}) for split in ("train", "test")})
    with pytest.raises(ValueError, match="not an Image feature"):
        load_task_dataset("cifar10", as_strings)


def test_unlabelled_rows_rejected_but_filtered_rows_accepted(synthetic_imdb):
    unlabelled = Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, -1]})
    with pytest.raises(ValueError, match=r"range over \[-1, 1\]"):
        load_task_dataset("imdb", DatasetDict({"train": unlabelled, "test": synthetic_imdb["test"]}))
    filtered = unlabelled.filter(lambda row: row["label"] >= 0)
    assert len(load_task_dataset("imdb", DatasetDict({"train": filtered, "test": synthetic_imdb["test"]}))["train"]) == 2


def test_rows_without_a_label_or_review_and_empty_splits_are_refused(synthetic_imdb, tmp_path):
    # a null label became NaN (IMDB: a model of NaN weights, saved) or an out-of-range id (CIFAR-10); a null review failed
    # deep in the tokenizer; an empty split failed inside datasets without naming the folder
    test = synthetic_imdb["test"]
    for column, values in (("label", [0, None, 1]), ("text", ["good", None, "bad"])):
        rows = {"text": ["good", "meh", "bad"], "label": [0, 1, 1], column: values}
        with pytest.raises(ValueError, match=rf"1 row\(s\) of the imdb 'train' split have no .*null in column '{column}'"):
            load_task_dataset("imdb", DatasetDict({"train": Dataset.from_dict(rows), "test": test}))
    with pytest.raises(ValueError, match="The imdb 'test' split has no rows"):
        load_task_dataset("imdb", DatasetDict({"train": synthetic_imdb["train"], "test": test.select([])}))
    folder = tmp_path / "empty_test"
    folder.mkdir()
    synthetic_imdb["train"].to_csv(folder / "train.csv")
    test.select([]).to_csv(folder / "test.csv")
    with pytest.raises(ValueError, match="Could not load the folder .* non-empty train and test splits"):
        load_task_dataset("imdb", str(folder), cache_dir=str(tmp_path / "cache"))
    DatasetDict({"train": synthetic_imdb["train"], "test": test.select([])}).save_to_disk(str(tmp_path / "saved_empty"))
    with pytest.raises(ValueError, match="Could not load the folder .*saved_empty"):
        load_task_dataset("imdb", str(tmp_path / "saved_empty"))
    synthetic_imdb.save_to_disk(str(tmp_path / "saved"))  # a save_to_disk folder loads as what it is
    assert load_task_dataset("imdb", str(tmp_path / "saved"))["test"]["text"] == test["text"]


def test_class_names_decide_what_an_id_means(synthetic_imdb):
    # ids numbered by another order of the same classes are renumbered; other classes are not this task's data
    swapped = synthetic_imdb["train"].cast_column("label", ClassLabel(names=["pos", "neg"]))  # same ids, names swapped
    loaded = load_task_dataset("imdb", DatasetDict({"train": swapped, "test": synthetic_imdb["test"]}))["train"]
    assert loaded.features["label"].names == ["neg", "pos"]
    assert loaded["label"] == [1 - label for label in synthetic_imdb["train"]["label"]]  # "pos" was 0, is now 1
    unlabelled = Dataset.from_dict({"text": ["a", "b"], "label": [0, -1]})  # the range check comes first: its own message
    with pytest.raises(ValueError, match=r"range over \[-1, 0\]"):
        load_task_dataset("imdb", DatasetDict({"train": unlabelled.cast_column("label", ClassLabel(names=["pos", "neg"])),
                                                "test": synthetic_imdb["test"]}))
    other = synthetic_imdb["train"].cast_column("label", ClassLabel(names=["cat", "dog"]))
    with pytest.raises(ValueError, match=r"names the classes \['cat', 'dog'\], but the imdb task's model predicts \['neg', 'pos'\]"):
        load_task_dataset("imdb", DatasetDict({"train": other, "test": synthetic_imdb["test"]}))


def test_missing_local_folder_and_offline_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task_dataset("cifar10", "../no/such/folder")
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("only checked offline; online this would download")
    with pytest.raises(ConnectionError, match=r"\.\./shared/data/cifar10"):
        load_task_dataset("cifar10")
    with pytest.raises(ConnectionError, match=r"no local folder 'nope/data' exists under"):  # a mistyped relative folder
        load_task_dataset("cifar10", "nope/data")


def test_task_specs():
    assert TASKS["cifar10"].hub_id == "uoft-cs/cifar10" and TASKS["cifar10"].input_column == "img"
    assert TASKS["imdb"].hub_id == "stanfordnlp/imdb" and TASKS["imdb"].input_column == "text"
    assert TASKS["cifar10"].num_labels == 10 and TASKS["imdb"].num_labels == 2


# -------------------------------------------------------------------------------------------------- reward split


def test_reward_split_disjoint_stratified_deterministic():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])  # sorted by label, like IMDB
    dataset = Dataset.from_dict({"row": np.arange(100), "label": labels})
    train_part, reward_part = split_reward(dataset, 0.2, seed=0)
    train_rows, reward_rows = set(train_part["row"]), set(reward_part["row"])
    assert len(reward_rows) == 20 and not train_rows & reward_rows and train_rows | reward_rows == set(range(100))
    assert np.bincount(reward_part["label"]).tolist() == [8, 6, 4, 2]
    assert list(split_reward(dataset, 0.2, seed=0)[1]["row"]) == list(reward_part["row"])
    assert set(split_reward(dataset, 0.2, seed=1)[1]["row"]) != reward_rows
    # The reward part is shuffled, so a prefix is not all one class.
    assert len(set(reward_part["label"][:8])) > 1
    assert len(split_reward(dataset, 7, seed=0)[1]) == 7


def test_reward_split_without_labels_and_apportionment():
    train_indices, reward_indices = split_reward_indices(None, 10, 3, seed=0)
    assert len(reward_indices) == 3 and sorted(np.concatenate([train_indices, reward_indices]).tolist()) == list(range(10))
    # 3 of 7 rows over classes of 4 and 3: quotas 1.71 and 1.29 -> 2 and 1.
    _, reward_indices = split_reward_indices([0, 0, 0, 0, 1, 1, 1], 7, 3, seed=0)
    assert sorted(np.asarray([0, 0, 0, 0, 1, 1, 1])[reward_indices].tolist()) == [0, 0, 1]


@pytest.mark.parametrize("bad_size", [0, 10, -1, 0.0, 1.0, 1.5, 0.01, 5.0])
def test_reward_size_out_of_range(bad_size):
    dataset = Dataset.from_dict({"label": [0, 1] * 5})
    with pytest.raises(ValueError, match="reward_size"):
        split_reward(dataset, bad_size, seed=0)


def test_reward_size_type():
    with pytest.raises(TypeError, match="reward_size"):
        split_reward(Dataset.from_dict({"label": [0, 1] * 5}), True, seed=0)


# ----------------------------------------------------------------------------------------------- image tensors


def test_decoded_tensor_equals_pil_pixels(synthetic_cifar, tmp_path):
    images, labels = images_to_tensor(synthetic_cifar["train"])
    assert images.dtype == torch.uint8 and images.shape == (60, 3, 32, 32)
    assert torch.equal(images, pil_pixels(synthetic_cifar["train"]))
    assert labels.dtype == torch.int64 and labels.tolist() == synthetic_cifar["train"]["label"]
    # A selection (indices mapping) decodes its own rows, in its order.
    selected = synthetic_cifar["train"].select([5, 2, 40])
    assert torch.equal(images_to_tensor(selected)[0], images[[5, 2, 40]])
    # The disk cache gives back the same tensors.
    cached_once = images_to_tensor(synthetic_cifar["test"], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    cached_twice = images_to_tensor(synthetic_cifar["test"], cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(cached_once, cached_twice))


def test_decoding_converts_to_rgb_and_rejects_mixed_sizes():
    def png(array):
        buffer = io.BytesIO()
        PIL.Image.fromarray(array).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    features = Features({"img": Image(), "label": ClassLabel(names=list(CIFAR10_LABELS))})
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4)
    images, _ = images_to_tensor(Dataset.from_dict({"img": [png(grey)], "label": [0]}, features=features))
    assert images.shape == (1, 3, 4, 4) and torch.equal(images[0, 1], torch.from_numpy(grey))
    mixed = Dataset.from_dict({"img": [png(grey), png(np.zeros((5, 5), np.uint8))], "label": [0, 1]}, features=features)
    with pytest.raises(ValueError, match="resize"):
        images_to_tensor(mixed)


def test_cached_image_dataset_items(synthetic_cifar):
    dataset = CachedImageDataset.from_dataset(synthetic_cifar["test"])
    item = dataset[3]
    assert len(dataset) == 20 and item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.uint8
    assert item["labels"] == synthetic_cifar["test"][3]["label"]


# ----------------------------------------------------------------------------------------------------- collator


def reference_crop_flip(images, offsets_y, offsets_x, flip_mask, pad):
    """One image at a time, the obvious way."""
    out = []
    for b in range(images.shape[0]):
        padded = torch.nn.functional.pad(images[b], (pad, pad, pad, pad))
        y, x = int(offsets_y[b]), int(offsets_x[b])
        crop = padded[:, y : y + images.shape[2], x : x + images.shape[3]]
        out.append(crop.flip(-1) if flip_mask[b] else crop)
    return torch.stack(out)


def test_crop_flip_matches_per_image_reference():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 6), dtype=torch.uint8, generator=generator)
    offsets_y = torch.randint(0, 5, (16,), generator=generator)
    offsets_x = torch.randint(0, 5, (16,), generator=generator)
    flip_mask = torch.rand(16, generator=generator) < 0.5
    expected = reference_crop_flip(images, offsets_y, offsets_x, flip_mask, pad=2)
    assert torch.equal(crop_flip(images, offsets_y, offsets_x, flip_mask, pad=2), expected)


def test_flip_only_gives_image_or_mirror():
    images = torch.randint(0, 256, (32, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = random_crop_flip(images, torch.Generator().manual_seed(0), pad=0, flip=True)
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_image_collator_shapes_determinism_and_eval(synthetic_cifar):
    dataset = CachedImageDataset.from_dataset(synthetic_cifar["train"])
    features = [dataset[i] for i in range(16)]
    batch = ImageCollator(train=True, seed=3)(features)
    assert batch["pixel_values"].shape == (16, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [f["labels"] for f in features]
    assert torch.equal(ImageCollator(train=True, seed=3)(features)["pixel_values"], batch["pixel_values"])
    assert not torch.equal(ImageCollator(train=True, seed=4)(features)["pixel_values"], batch["pixel_values"])
    # Successive batches of one collator get fresh augmentations.
    collator = ImageCollator(train=True, seed=3)
    assert not torch.equal(collator(features)["pixel_values"], collator(features)["pixel_values"])

    stacked = torch.stack([f["pixel_values"] for f in features])
    eval_batch = ImageCollator(train=False)(features)
    assert torch.equal(eval_batch["pixel_values"], normalize_images(stacked))
    assert torch.equal(ImageCollator(train=True, pad=0, flip=False, seed=0)(features)["pixel_values"], eval_batch["pixel_values"])
    expected = (stacked.float() / 255 - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(eval_batch["pixel_values"], expected)


def test_image_processor_matches_eval_preprocessing(synthetic_cifar, tmp_path):
    make_image_processor().save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    pictures = [synthetic_cifar["test"][i]["img"] for i in range(4)]
    processed = processor(pictures, return_tensors="pt")["pixel_values"]
    expected = normalize_images(images_to_tensor(synthetic_cifar["test"].select(range(4)))[0])
    torch.testing.assert_close(processed, expected, rtol=0, atol=1e-6)
    # Any other size is resized to 32x32, so a pipeline never feeds the CNN a shape it cannot take.
    assert processor(PIL.Image.new("L", (50, 40)), return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_special_tokens(imdb_tokenizer, tmp_path):
    assert imdb_tokenizer.pad_token_id == 0 and imdb_tokenizer.unk_token_id == 1
    assert imdb_tokenizer.padding_side == "right" and imdb_tokenizer.truncation_side == "right"
    assert imdb_tokenizer.model_input_names == ["input_ids", "attention_mask"]
    imdb_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["A GREAT film!<br /><br />Truly awful, xyzzyword.", "the movie"]
    assert reloaded(texts)["input_ids"] == imdb_tokenizer(texts)["input_ids"]
    assert reloaded.pad_token_id == 0 and len(reloaded) == len(imdb_tokenizer)


def test_tokenizer_normalizes_and_maps_unknown_words(imdb_tokenizer):
    encode = lambda text: imdb_tokenizer(text)["input_ids"]
    assert encode("great<br />movie") == encode("great movie") == encode("GREAT<br/>Movie")
    tokens = imdb_tokenizer.convert_ids_to_tokens(encode("Great, xyzzyword!"))
    assert tokens == ["great", ",", "[UNK]", "!"]
    padded = imdb_tokenizer(["great", "the great movie"], padding=True)
    assert padded["input_ids"][0][1:] == [0, 0] and padded["attention_mask"][0] == [1, 0, 0]
    assert len(imdb_tokenizer(" ".join(["movie"] * 100), truncation=True)["input_ids"]) == 32


def test_tokenizer_validation():
    with pytest.raises(ValueError, match="vocab_size = 2 is too small"):
        train_word_tokenizer(["a b"], vocab_size=2)
    with pytest.raises(ValueError, match="empty"):
        train_word_tokenizer([])
    with pytest.raises(TypeError, match="not one string"):
        train_word_tokenizer("a single text")


def test_vocab_size_and_min_frequency_limit_the_vocabulary():
    tokenizer = train_word_tokenizer(["a a a b b c"], vocab_size=3, min_frequency=1)
    assert tokenizer.get_vocab() == {"[PAD]": 0, "[UNK]": 1, "a": 2}
    tokenizer = train_word_tokenizer(["a a a b b c"], vocab_size=100, min_frequency=2)
    assert set(tokenizer.get_vocab()) == {"[PAD]", "[UNK]", "a", "b"}


def test_tokenized_dataset_collator_and_tensors_agree(synthetic_imdb, imdb_tokenizer):
    tokenized = tokenize_dataset(synthetic_imdb["test"], imdb_tokenizer, max_length=32)
    assert tokenized.column_names == ["label", "input_ids", "attention_mask"]
    assert max(len(ids) for ids in tokenized["input_ids"]) <= 32
    batch = make_text_collator(imdb_tokenizer)([tokenized[i] for i in range(len(tokenized))])
    tensors = tokenized_to_tensors(tokenized, imdb_tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for key in batch:
        assert torch.equal(batch[key], tensors[key]), key
    empty = tokenize_dataset(Dataset.from_dict({"text": ["", "great"], "label": [0, 1]}), imdb_tokenizer, max_length=8)
    assert empty["input_ids"][0] == [imdb_tokenizer.unk_token_id]


# ------------------------------------------------------------------------------------------------ synthetic data


def test_synthetic_cifar_features_and_learnable(synthetic_cifar):
    assert synthetic_cifar["train"].features == Features({"img": Image(), "label": ClassLabel(names=list(CIFAR10_LABELS))})
    assert synthetic_cifar["train"].features["label"].names[0] == "airplane"
    assert synthetic_cifar["train"][0]["img"].size == (32, 32) and synthetic_cifar["train"][0]["img"].mode == "RGB"
    raw = synthetic_cifar["train"].with_format("arrow")[:1].column("img")[0].as_py()
    assert raw["bytes"].startswith(b"\x89PNG")
    again = make_synthetic_cifar(num_train=60, num_test=20, seed=0)
    assert torch.equal(images_to_tensor(again["train"])[0], images_to_tensor(synthetic_cifar["train"])[0])
    # Structure a classifier can find: even the mean colour alone (nearest class centroid) beats chance (0.1).
    bigger = make_synthetic_cifar(num_train=500, num_test=200, seed=1)
    train_images, train_labels = images_to_tensor(bigger["train"])
    test_images, test_labels = images_to_tensor(bigger["test"])
    colour = lambda images: images.float().mean((2, 3))  # (N, 3)
    centroids = torch.stack([colour(train_images)[train_labels == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(colour(test_images), centroids).argmin(1) == test_labels).float().mean()
    assert accuracy > 0.35


def test_synthetic_imdb_features_and_learnable(synthetic_imdb):
    assert synthetic_imdb["train"].features == Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    assert sum(synthetic_imdb["train"]["label"]) == 30
    assert make_synthetic_imdb(num_train=60, num_test=20, seed=0)["train"]["text"] == synthetic_imdb["train"]["text"]
    assert any("<br /><br />" in text for text in synthetic_imdb["train"]["text"])
    # The cue words decide the label: counting them classifies every review.
    from hf_rlprune.data import _NEGATIVE_WORDS, _POSITIVE_WORDS

    for row in synthetic_imdb["test"]:
        words = row["text"].lower().replace("<br />", " ").replace(".", " ").replace("!", " ").replace(",", " ").split()
        score = sum(w in _POSITIVE_WORDS for w in words) - sum(w in _NEGATIVE_WORDS for w in words)
        assert (score > 0) == (row["label"] == 1)


@pytest.mark.parametrize("make", [make_synthetic_cifar, make_synthetic_imdb])
def test_synthetic_sizes_validated(make):
    with pytest.raises(ValueError, match="num_test"):
        make(num_train=4, num_test=0)
