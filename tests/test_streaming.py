"""--streaming: parquet and webdataset shards read as a stream, split across ranks, resumed exactly."""

from __future__ import annotations

import io
import json
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, accelerate_launch, train
from test_train import assert_same, final_weights
from trainer.config import build_config, validate
from trainer.data import streaming
from trainer.data.streaming import StreamEpochs, find_shards, load_image_stream
from trainer.errors import ConfigError, DataError
from trainer.trainer import Trainer

SHARD_ROWS = (10, 11, 12, 13)  # 46 images in 4 shards: two ranks get whole shards of unequal length
N_IMAGES = sum(SHARD_ROWS)
STREAM = ["--streaming", "--num_samples", "0", "--channels", "1", "--image_size", "8"]


@pytest.fixture(autouse=True)
def no_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s after each shuffled parquet stream it closes (for pyarrow's threads); not in tests."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def png(i: int) -> bytes:
    """Image i: 8x8 gray, every pixel 5 i + 10, so a decoded sample names its image."""
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8), 5 * i + 10, np.uint8), mode="L").save(out, "PNG")
    return out.getvalue()


def ids(x: torch.Tensor) -> list[int]:
    """The images of a batch [B, 1, 8, 8] in [-1, 1]."""
    return [round((float(v) + 1) * 127.5 - 10) // 5 for v in x[:, 0, 0, 0]]


@pytest.fixture
def shards(tmp_path):
    import datasets

    folder = tmp_path / "shards"
    folder.mkdir()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    start = 0
    for s, n in enumerate(SHARD_ROWS):
        rows = range(start, start + n)
        start += n
        datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in rows], "label": list(rows)},
                                   features=features).to_parquet(str(folder / f"part-{s:03d}.parquet"))
    return folder


@pytest.fixture
def seen(monkeypatch):
    """The images of every micro-batch the Trainer consumes, run after run."""
    batches = []
    original = Trainer._batches

    def spy(self):
        for batch in original(self):
            batches.append(ids(batch["x"]))
            yield batch

    monkeypatch.setattr(Trainer, "_batches", spy)
    return batches


def data_position(run_dir, step: int) -> tuple[int, int]:
    state = json.loads((run_dir / "checkpoints" / f"step-{step:08d}" / "state.json").read_text())
    return state["data_epoch"], state["data_offset"]


def test_a_stopped_and_resumed_stream_sees_the_samples_of_an_uninterrupted_run(tmp_path, shards, seen, one_thread):
    """16 steps of 4 images over epochs of 11 batches (46 images, the partial batch dropped), against a run
    stopped in the middle of epoch 0, again at its last batch, then resumed with DataLoader workers."""
    common = ["--dataset", str(shards), *STREAM, "--save_and_sample_every", "100"]
    straight = train(tmp_path / "a", *common, "--train_num_steps", "16")
    uninterrupted = list(seen)
    seen.clear()
    train(tmp_path / "b", *common, "--train_num_steps", "6")
    train(tmp_path / "b", *common, "--resume", "latest", "--train_num_steps", "11")
    resumed = train(tmp_path / "b", *common, "--resume", "latest", "--train_num_steps", "16", "--num_workers", "2")

    assert seen == uninterrupted
    assert_same(final_weights(straight), final_weights(resumed))
    epoch0, epoch1 = sum(uninterrupted[:11], []), sum(uninterrupted[11:], [])
    assert len(set(epoch0)) == 44 and set(epoch0) <= set(range(N_IMAGES))  # each image at most once per epoch
    assert epoch1 != epoch0[:len(epoch1)]  # reshuffled
    assert data_position(resumed, 6) == (0, 24) and data_position(resumed, 11) == (0, 44)
    assert data_position(resumed, 16) == (1, 20)


@pytest.mark.slow
def test_two_processes_resume_a_stream_exactly(tmp_path, shards):
    """Two gloo processes with shares of 21 and 25 images, epochs of 5 batches of 4 on both (the longer share
    has a 6th): a run stopped at step 6, just after the end of epoch 0, and resumed to 8 with DataLoader
    workers ends with the weights of a run that never stopped."""
    def launch(run: str, *args: str) -> None:
        result = accelerate_launch("trainer/train.py", *TINY, "--dataset", str(shards), *STREAM, "--results_path",
                                   str(tmp_path), "--run_name", run, "--save_and_sample_every", "3", *args)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    launch("straight", "--train_num_steps", "8")
    launch("stopped", "--train_num_steps", "6")
    launch("stopped", "--resume", "latest", "--train_num_steps", "8", "--num_workers", "2")
    assert data_position(tmp_path / "stopped", 3) == (0, 24) and data_position(tmp_path / "stopped", 6) == (1, 8)
    assert data_position(tmp_path / "stopped", 8) == data_position(tmp_path / "straight", 8) == (1, 24)
    assert_same(final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped"))


@pytest.mark.parametrize("world", [2, 3])  # 4 shards: whole shards per rank, or every third example
def test_ranks_see_disjoint_samples_that_cover_the_stream(shards, world):
    dataset = load_image_stream(str(shards), image_size=8, channels=1)
    for epoch in (0, 1):
        shares = [ids(torch.stack([dataset[e]["x"] for e in dataset.rows(epoch, r, world, 0)])) for r in range(world)]
        assert sorted(sum(shares, [])) == list(range(N_IMAGES))
    one_rank = [ids(dataset[e]["x"][None]) for e in dataset.rows(0, 0, 1, 0)]
    assert one_rank == [ids(dataset[e]["x"][None]) for e in dataset.rows(0, 0, 1, 0)]  # the same order each time
    assert one_rank != [ids(dataset[e]["x"][None]) for e in dataset.rows(0, 0, 1, 1)]  # another seed, another


@pytest.fixture
def no_process_group(monkeypatch):
    """Positions of several ranks in one process: no gloo group to agree through."""
    monkeypatch.setattr(streaming, "_gloo_group", lambda: None)


def test_an_epoch_ends_on_every_rank_when_the_shortest_share_runs_out(shards, no_process_group):
    """Two ranks in two threads, agreeing through a barrier as they would through the all-reduce: their
    shares hold 21 and 25 images, 5 and 6 batches of 4, and both take 5."""
    dataset = load_image_stream(str(shards), image_size=8, channels=1)
    flags, barrier = [None, None], threading.Barrier(2)

    def agreement(rank):
        def all_ranks_have(have: bool) -> bool:
            flags[rank] = have
            barrier.wait()
            agreed = all(flags)
            barrier.wait()
            return agreed
        return all_ranks_have

    positions = [dataset.position(4, r, 2, 0) for r in range(2)]
    got = [[], []]

    def run(rank):
        p = positions[rank]
        p.all_ranks_have = agreement(rank)
        for epoch in range(2):
            # The position is its own loader here: its batches are of encoded images.
            got[rank].append([ids(torch.stack([dataset[e]["x"] for e in b])) for b in StreamEpochs(p, p)])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lengths = sorted(len(list(dataset.rows(0, r, 2, 0))) for r in range(2))
    assert lengths == [21, 25]
    assert [len(e) for e in got[0]] == [len(e) for e in got[1]] == [5, 5]
    assert [p.epoch for p in positions] == [2, 2] and [p.offset for p in positions] == [0, 0]
    for epoch in range(2):
        assert not set(sum(got[0][epoch], [])) & set(sum(got[1][epoch], []))


def test_a_resume_skips_each_ranks_consumed_samples(shards, no_process_group):
    dataset = load_image_stream(str(shards), image_size=8, channels=1)
    whole = list(dataset.position(4, 1, 2, 0))
    p = dataset.position(4, 1, 2, 0)
    assert p.set_position(0, 2 * 8 + 3) == 3  # not a whole global batch: 3 samples are seen again
    assert (p.epoch, p.offset) == (0, 16)
    assert list(p) == whole[2:]


def test_webdataset_shards_and_globs_stream_too(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    for s in range(2):
        with tarfile.open(folder / f"shard-{s}.tar", "w") as tar:
            for i in range(s * 6, s * 6 + 6):
                for ext, data in (("png", png(i)), ("cls", str(i).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    dataset = load_image_stream(str(folder), image_size=8, channels=1)
    assert dataset.column == "png"
    assert sorted(ids(torch.stack([dataset[e]["x"] for e in dataset.rows(0, 0, 1, 0)]))) == list(range(12))
    one = load_image_stream(str(folder / "shard-1*.tar"), image_size=8, channels=1)
    assert sorted(ids(torch.stack([one[e]["x"] for e in one.rows(0, 0, 1, 0)]))) == list(range(6, 12))
    assert find_shards(str(folder)) == ("webdataset", [str(folder / "shard-0.tar"), str(folder / "shard-1.tar")])


def config(**values):
    cfg = build_config({"preset": "tiny", "streaming": True, **values}, has_gpu=False)
    validate(cfg)
    return cfg


def test_streaming_is_refused_where_there_is_nothing_to_stream(tmp_path, shards):
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    (pngs / "a.png").write_bytes(png(1))
    with pytest.raises(ConfigError, match="--dataset shapes is built in"):
        config(dataset="shapes")
    with pytest.raises(ConfigError, match=r"--train_data_dir .*pngs holds none.*drop --streaming"):
        config(train_data_dir=str(pngs))
    with pytest.raises(ConfigError, match=r"--dataset .*pngs holds none"):
        config(dataset=str(pngs))
    with pytest.raises(ConfigError, match="clips and simulations"):
        config(dataset="navier_stokes")
    with pytest.raises(ConfigError, match="clips and simulations"):
        config(dataset="moving_shapes", model="unet3d", frames=4)
    with pytest.raises(ConfigError, match="matches no files"):
        config(dataset=str(tmp_path / "nothing-*.parquet"))
    with pytest.raises(DataError, match="'label' of --dataset .* does not hold images"):
        load_image_stream(str(shards), image_column="label", image_size=8, channels=1)
    assert config(dataset="someone/some-hub-dataset").data.streaming  # checked when it is loaded
    assert config(train_data_dir=str(shards), dataset="shapes").data.streaming
    (shards / "extra.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match="both .parquet and .tar"):
        config(dataset=str(shards))
