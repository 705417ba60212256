"""build_dataloader: DistributedSampler order, rank split, resuming mid-epoch with exactly the next samples."""

import itertools

import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler, IterableDataset

from openvid_models.data import build_dataloader


class Numbers(Dataset):
    """Item i is i, with the epoch the dataset copy was told (to see set_epoch reach the workers)."""

    def __init__(self, size):
        self.size, self.epoch = size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return {"index": index, "epoch": self.epoch}


def indices(batches):
    return [batch["index"].tolist() for batch in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_order_is_distributed_samplers(num_workers):
    dataset = Numbers(23)
    loader = build_dataloader(dataset, 4, rank=1, world_size=2, num_workers=num_workers, seed=9)
    reference = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=9, drop_last=True)
    for epoch in range(2):
        reference.set_epoch(epoch)
        order = list(reference)  # 11 samples per rank, 2 full batches of 4
        assert len(loader) == 2
        batches = list(loader)
        assert indices(batches) == [order[0:4], order[4:8]]
        assert all(batch["epoch"].eq(epoch).all() for batch in batches)


def test_ranks_disjoint_and_complete():
    dataset = Numbers(24)
    seen = [sum(indices(build_dataloader(dataset, 3, rank=rank, world_size=2, seed=1)), []) for rank in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))
    assert seen[0] != sorted(seen[0])  # shuffled


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("consumed", [0, 1, 3, 5, 6])  # 6 batches per epoch: 6 is the end of an epoch
def test_resume_continues_with_the_next_samples(num_workers, consumed):
    dataset = Numbers(50)
    settings = dict(rank=0, world_size=2, num_workers=num_workers, seed=4)
    reference = build_dataloader(dataset, 4, **settings)
    uninterrupted = indices(list(reference) + list(reference))  # two epochs
    assert len(uninterrupted) == 12

    first = build_dataloader(dataset, 4, **settings)
    taken = indices(itertools.islice(iter(first), consumed))
    state = first.state_dict()
    assert state["epoch"] == (1 if consumed == 6 else 0)
    assert state["samples_consumed"] == (0 if consumed == 6 else 4 * consumed)

    resumed = build_dataloader(dataset, 4, **settings)
    resumed.load_state_dict(state)
    assert len(resumed) == 6 - consumed % 6
    rest = indices(resumed)
    rest += indices(resumed) if consumed < 6 else []  # the next epoch follows
    assert taken + rest == uninterrupted


def test_leaving_a_pass_early_continues_there():
    loader = build_dataloader(Numbers(16), 2, seed=0)
    reference = indices(build_dataloader(Numbers(16), 2, seed=0))
    got = []
    for _ in range(4):
        got += indices(itertools.islice(iter(loader), 2))
    assert got == reference


def test_resume_checks_settings():
    dataset = Numbers(20)
    state = build_dataloader(dataset, 2, rank=0, world_size=2, seed=1).state_dict()
    with pytest.raises(ValueError, match="world_size=2 vs 4"):
        build_dataloader(dataset, 2, rank=0, world_size=4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=1 vs 2"):
        build_dataloader(dataset, 2, rank=0, world_size=2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_size=20 vs 21"):
        build_dataloader(Numbers(21), 2, rank=0, world_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="start must be in"):
        build_dataloader(dataset, 2, rank=0, world_size=2, seed=1).load_state_dict({**state, "samples_consumed": 11})


def test_no_drop_last_and_arguments():
    loader = build_dataloader(Numbers(10), 4, drop_last=False, shuffle=False)
    assert indices(loader) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert loader.state_dict()["epoch"] == 1
    assert build_dataloader(Numbers(10), 4).loader.pin_memory == torch.cuda.is_available()

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(TypeError, match="map-style"):
        build_dataloader(Stream(), 2)
    with pytest.raises(ValueError, match="rank"):
        build_dataloader(Numbers(10), 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        build_dataloader(Numbers(10), 0)
