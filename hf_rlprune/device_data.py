"""Data kept on the device (benchmarks on a GPU): whole splits as tensors, batches gathered by index there, with no
per-batch host work and no transfers.
"""

import torch

from .data import CachedImageDataset, normalize_images, random_crop_flip, tokenized_to_tensors


class IndexDataset(torch.utils.data.Dataset):
    """Rows 0..n-1; a DeviceBatchCollator turns a list of row indices into a batch gathered on the device."""

    def __init__(self, num_rows: int):
        self.num_rows = num_rows

    def __len__(self):
        return self.num_rows

    def __getitem__(self, index):
        return index


class DeviceBatchCollator:
    """Gathers rows from tensors already on the device; images get batched crop/flip (train) and normalization.

    Text rows are right-padded (N, T) tensors; each batch is trimmed to its longest row.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], train: bool, seed: int = 0):
        self.tensors = tensors
        self.train = train
        self.is_image = "images" in tensors
        device = next(iter(tensors.values())).device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, indices) -> dict:
        device = self.tensors["labels"].device
        index = torch.as_tensor(indices, device=device)
        if self.is_image:
            images = self.tensors["images"].index_select(0, index)  # (B, 3, H, W) uint8
            if self.train:
                images = random_crop_flip(images, self.generator)
            return {"pixel_values": normalize_images(images), "labels": self.tensors["labels"].index_select(0, index)}
        mask = self.tensors["attention_mask"].index_select(0, index)  # (B, T)
        longest = int(mask.sum(dim=1).max())
        return {
            "input_ids": self.tensors["input_ids"].index_select(0, index)[:, :longest],
            "attention_mask": mask[:, :longest],
            "labels": self.tensors["labels"].index_select(0, index),
        }


def task_tensors(dataset, device, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """A prepared split (CachedImageDataset or tokenized Dataset) as tensors on `device`."""
    if isinstance(dataset, CachedImageDataset):
        return {"images": dataset.images.to(device), "labels": dataset.labels.to(device)}
    tensors = tokenized_to_tensors(dataset.with_format(None), pad_token_id=pad_token_id, label_column="labels")
    return {key: value.to(device) for key, value in tensors.items()}


@torch.no_grad()
def tensor_accuracy(model, tensors: dict, batch_size: int = 1024, autocast_dtype=None) -> float:
    collator = DeviceBatchCollator(tensors, train=False)
    total = tensors["labels"].shape[0]
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=tensors["labels"].device)
    device_type = tensors["labels"].device.type
    for start in range(0, total, batch_size):
        batch = collator(range(start, min(start + batch_size, total)))
        labels = batch.pop("labels")
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            correct += (model(**batch).logits.argmax(-1) == labels).sum()
    model.train(was_training)
    return float(correct) / total
