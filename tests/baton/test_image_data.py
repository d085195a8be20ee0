"""Image folders with random augmentation and loader workers: the batches of a resumed or
re-run epoch are bitwise those of the first, whatever the number of workers; bad data
fails early with a message that names the file or folder."""

import os
import signal

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from baton import build
from baton.config import load_config
from baton.data import ResumableLoader, check_same_classes
from baton.data.datasets import ImageFolder
from baton.data.example_data import write_digits_images
from baton.data.transforms import Compose
from baton.errors import DataError
from baton.run import pipeline as pl

from .image_folders import augmentation, make_image_folder

# Three workers on a two-core machine is what the test means to do.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "train")


def augmented(root) -> ImageFolder:
    return build.build(
        {"type": "ImageFolder", "root": str(root), "mode": "L", "transform": augmentation()},
        "dataset",
    )


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (x, y), (x2, y2) in zip(a, b, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_augmented_batches_are_a_function_of_seed_epoch_and_sample(folder):
    dataset = augmented(folder)
    runs = {}
    for workers in (0, 2, 3):
        loader = ResumableLoader(dataset, 5, seed=3, num_workers=workers)
        before = torch.get_rng_state()
        try:
            full = list(loader.iter_epoch(1))
            resumed = list(loader.iter_epoch(1, start=2))  # jumps: batches 0-1 are not read
            runs[workers] = full, list(loader.iter_epoch(2))
        finally:
            loader.close()
        assert torch.equal(before, torch.get_rng_state()), "reading data moved training's RNG"
        assert_same_batches(full[2:], resumed)
    for workers in (2, 3):
        assert_same_batches(runs[0][0], runs[workers][0])
        assert_same_batches(runs[0][1], runs[workers][1])
    first, second = runs[0]
    assert first[0][0].shape == (5, 1, 10, 10)
    assert not torch.equal(first[0][0], second[0][0]), "each epoch draws new augmentations"


def test_control_workers_seeded_from_the_global_rng_break_a_resume(folder):
    """What the loader did before: a new DataLoader per epoch and at the resume point,
    its workers seeded from the global RNG. The resumed batches differ."""
    dataset = augmented(folder)
    batches = [b.tolist() for b in ResumableLoader(dataset, 5, seed=3).batch_indices(1)]

    def old_loader(start: int) -> list:
        torch.manual_seed(0)  # the same global RNG state both times: the fairest case
        return list(DataLoader(dataset, batch_sampler=batches[start:], num_workers=2))

    full, resumed = old_loader(0), old_loader(2)
    assert [y.tolist() for _, y in full[2:]] == [y.tolist() for _, y in resumed]
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full[2:], resumed, strict=True))


class WorkerPid(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return os.getpid()


def test_workers_start_once_and_serve_every_epoch_until_closed():
    loader = ResumableLoader(WorkerPid(), 2, num_workers=2)
    try:
        pids = [set(torch.cat(list(loader.iter_epoch(e))).tolist()) for e in (1, 2, 3)]
        assert len(pids[0]) == 2 and os.getpid() not in pids[0]
        assert pids[0] == pids[1] == pids[2]
        loader.close()
        assert set(torch.cat(list(loader.iter_epoch(4))).tolist()).isdisjoint(pids[0])
    finally:
        loader.close()


def test_workers_leave_sigterm_to_the_main_process():
    loader = ResumableLoader(WorkerPid(), 2, num_workers=2)
    try:
        pids = set(torch.cat(list(loader.iter_epoch(1))).tolist())
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        assert set(torch.cat(list(loader.iter_epoch(2))).tolist()) == pids
    finally:
        loader.close()


def test_compose_runs_kornia_augmentations_on_one_image():
    image = torch.rand(1, 12, 12)
    out = build.build(augmentation(size=8), "transform")(image)
    assert out.shape == (1, 8, 8)
    assert torch.equal(Compose([])(image), image)


def test_a_bare_kornia_augmentation_is_refused_with_the_fix(folder):
    dataset = build.build(
        {"type": "ImageFolder", "root": str(folder), "transform": {"type": "RandomHorizontalFlip"}},
        "dataset",
    )
    with pytest.raises(DataError, match="put kornia augmentations inside"):
        dataset[0]


def test_image_folder_layout_and_labels(folder):
    dataset = ImageFolder(str(folder), mode="L")
    assert dataset.classes == ["a", "b", "c"] and dataset.class_to_idx["c"] == 2
    assert len(dataset) == 24 and dataset.targets[0] == 0
    image, label = dataset[23]
    assert image.shape == (1, 12, 12) and image.dtype == torch.float32 and label == 2
    assert ImageFolder(str(folder))[0][0].shape == (3, 12, 12)  # RGB by default


def test_empty_or_missing_folders_are_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}' does not exist"):
        ImageFolder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        ImageFolder(str(tmp_path / "empty"))
    (tmp_path / "empty" / "cat").mkdir()
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"no images \(.*\) in .*cat; add images"):
        ImageFolder(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="class folders missing: .*dog"):
        ImageFolder(str(tmp_path / "empty"), classes=["cat", "dog"])


def test_classes_name_sub_folders_of_root_only(tmp_path):
    # a run's config names `classes`; none may reach files outside the allowed root
    root = make_image_folder(tmp_path / "data" / "train", classes=("cat",), per_class=1)
    outside = make_image_folder(tmp_path / "outside", classes=("secret",), per_class=1)
    (root / "linked").symlink_to(outside / "secret")
    for name in ("../../outside/secret", str(outside / "secret"), "/", "..", "linked"):
        with pytest.raises(DataError, match=f"classes entry {name!r} is not a sub-folder"):
            ImageFolder(str(root), classes=["cat", name])
    assert ImageFolder(str(root), classes=["cat"]).classes == ["cat"]


def test_a_corrupt_image_is_named_before_training(tmp_path):
    root = make_image_folder(tmp_path / "train")
    (root / "b" / "999.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"1 file\(s\) are not readable images: .*b/999.png"):
        ImageFolder(str(root))


def test_a_damaged_image_found_while_training_is_one_line_naming_it(tmp_path):
    root = make_image_folder(tmp_path / "train")
    good = (root / "a" / "000.png").read_bytes()
    (root / "a" / "000.png").write_bytes(good[: len(good) // 2])  # truncated
    dataset = ImageFolder(str(root), check_files=False)
    loader = ResumableLoader(dataset, 4, num_workers=2)
    try:
        with pytest.raises(DataError) as caught:
            list(loader.iter_epoch(1))
    finally:
        loader.close()
    message = str(caught.value)
    assert "a/000.png: not a readable image" in message and "\n" not in message
    assert "Traceback" in caught.value.__notes__[0]  # the details are kept, out of the way


def test_train_and_val_with_different_classes_are_refused_before_training(tmp_path):
    train = make_image_folder(tmp_path / "train", classes=("cat", "dog"), per_class=2)
    val = make_image_folder(tmp_path / "val", classes=("cat", "cow"), per_class=2)
    cfg = load_config(
        {
            "experiment_name": "mismatch",
            "work_dir": str(tmp_path / "work"),
            "model": {"type": "MLP", "in_features": 432, "num_classes": 2},
            "train_data": {"dataset": {"type": "ImageFolder", "root": str(train)}, "batch_size": 2},
            "val_data": {"dataset": {"type": "ImageFolder", "root": str(val)}, "batch_size": 2},
            "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.1}},
            "train": {"max_epochs": 1},
        }
    )
    with pytest.raises(DataError, match=r"only in train: \['dog'\]; only in val: \['cow'\]"):
        pl.build_pipeline(cfg)
    assert not (tmp_path / "work").exists()


def test_special_files_named_like_images_are_skipped(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=1)
    os.mkfifo(root / "a" / "fifo.png")  # reading it would block forever
    assert len(ImageFolder(str(root))) == 3


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_images(tmp_path_factory.mktemp("example") / "digits")


def test_digits_images_are_written_once_and_whole(digits):
    train, val = ImageFolder(str(digits / "train"), mode="L"), ImageFolder(str(digits / "val"))
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert train.classes == [str(d) for d in range(10)] == val.classes
    assert Image.open(train.samples[0][0]).size == (16, 16)
    assert [p.name for p in digits.parent.iterdir()] == ["digits"]  # no staging folder left
    before = (digits / "train" / "0").stat().st_mtime_ns
    write_digits_images(digits)
    assert (digits / "train" / "0").stat().st_mtime_ns == before


@pytest.mark.slow
def test_the_digits_images_example_trains(digits, tmp_path):
    cfg = load_config(
        "configs/digits_images.yaml",
        [
            f"work_dir={tmp_path / 'work'}",
            f"train_data.dataset.root={digits / 'train'}",
            f"val_data.dataset.root={digits / 'val'}",
            "train.max_epochs=null",
            "train.max_iters=6",
            "param_scheduler=[]",
        ],
    )
    pipeline, ref = pl.run(cfg)
    assert ref is not None and ref.iter == 6
    assert pipeline.history[-1]["val/accuracy"] > 0.2


def test_pin_memory_follows_the_device_unless_set(folder, tmp_path):
    data = {
        "experiment_name": "pins",
        "work_dir": str(tmp_path),
        "model": {"type": "MLP", "in_features": 144, "num_classes": 3},
        "train_data": {
            "dataset": {"type": "ImageFolder", "root": str(folder), "mode": "L"},
            "batch_size": 4,
            "num_workers": 1,
            "prefetch_factor": 3,
        },
        "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.1}},
        "train": {"max_epochs": 1},
    }
    auto = pl.build_pipeline(load_config(data))
    assert auto.train_loader.pin_memory == (auto.strategy.device.type == "cuda")
    assert auto.train_loader.prefetch_factor == 3 and auto.train_loader.persistent_workers
    pinned = pl.build_pipeline(load_config(data, {"train_data.pin_memory": True}))
    assert pinned.train_loader.pin_memory


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_arrive_pinned_for_a_cuda_run(folder):
    loader = ResumableLoader(ImageFolder(str(folder)), 4, num_workers=2, pin_memory=True)
    try:
        images, labels = next(iter(loader.iter_epoch(1)))
    finally:
        loader.close()
    assert images.is_pinned() and labels.is_pinned()


def torchvision_or_skip():
    try:
        import torchvision
        from torchvision.transforms import v2
    except Exception as err:  # its CUDA wheels fail to load with a CPU torch: RuntimeError
        pytest.skip(f"torchvision is not usable here: {err}")
    return torchvision, v2


def test_torchvision_folders_and_v2_transforms_are_exact_across_workers(folder):
    torchvision, v2 = torchvision_or_skip()
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomResizedCrop((10, 10), scale=(0.5, 1.0)),
            v2.RandomHorizontalFlip(),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    runs = {}
    for workers in (0, 2):
        loader = ResumableLoader(dataset, 5, seed=3, num_workers=workers)
        try:
            runs[workers] = list(loader.iter_epoch(1)), list(loader.iter_epoch(1, start=2))
        finally:
            loader.close()
    assert_same_batches(runs[0][0], runs[2][0])
    assert_same_batches(runs[0][0][2:], runs[2][1])
    check_same_classes(dataset, ImageFolder(str(folder)))  # the same labels as baton's
