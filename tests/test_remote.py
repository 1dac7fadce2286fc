"""pipeline.data.remote against a real HTTP server on loopback (no mock of the HTTP layer).

The server is ``http.server`` (which, like ``python -m http.server``, ignores ``Range``) serving a
copy of the ``latent_shards`` fixture, with faults injected per file: a connection that drops after
N bytes (on the first requests, or always), an HTTP 503, or a server variant that honours Range.
Checked: folder URLs, brace patterns, ``::`` lists and ``pipe:`` give the same samples, byte for
byte, as the local folder; a dropped connection is resumed; an unreadable shard is skipped, counted
and named in one warning line; a bad source is one clear line; and ``pipeline.train`` on
``http://…/latents/`` (and on a URL pattern) gives the same losses as on the local folder.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import tarfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline import train
from pipeline.config import load_config, save_config
from pipeline.config.source import URL
from pipeline.data import http_source, remote, sizes
from pipeline.data.latents import latent_loader, latent_meta, shard_list
from pipeline.data.paths import map_paths, resolved_from
from pipeline.data.shards import complete_shards, iter_samples
from pipeline.data.stream import LoaderConfig
from pipeline.encoders import TextEncodersConfig
from pipeline.training.dit_config import TrainConfig
from tests.helpers import free_port
from tests.shard_server import serving

CUT = 10_000  # bytes a faulty connection delivers before it drops (the shards are ~10x larger)
NO_STATS = "latents-000001"  # the served copy has no _stats.json for this shard: sizes come from the stream


@pytest.fixture(scope="module")
def served(latent_shards: Path, tmp_path_factory) -> Path:
    """``ROOT/latents``: a copy of the latent folder whose dataset.json holds absolute encoder paths
    (a remote folder's relative paths are not resolved), one shard without its _stats.json, and
    ``ROOT/no_list/dataset.json`` without a shard list."""
    root = tmp_path_factory.mktemp("served")
    folder = root / "latents"
    shutil.copytree(latent_shards, folder)
    meta = map_paths(json.loads((latent_shards / "dataset.json").read_text()), resolved_from(latent_shards))
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    (folder / f"{NO_STATS}_stats.json").unlink()
    (root / "no_list").mkdir()
    (root / "no_list/dataset.json").write_text(json.dumps({"kind": "latent_shards"}))
    return root


def local_shards(root: Path) -> list[str]:
    return [str(p) for p in complete_shards(root / "latents")]


def without_url(samples: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in samples]


def read_local(shards: list[str]) -> list[dict]:
    return without_url(list(iter_samples(shards)))


def piece_ranges(shard: str, chunk: int) -> tuple[set[str], set[str]]:
    """A shard's read-ahead ``Range`` headers: (those holding a member's bytes, all). The pieces
    after the last member hold only the end-of-archive padding: the reader stops before them, so
    they may be asked for or dropped before they are."""
    size = Path(shard).stat().st_size
    with tarfile.open(shard) as tar:
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers())
    spans = {a: f"bytes={a}-{min(a + chunk, size) - 1}" for a in range(0, size, chunk)}
    return {r for a, r in spans.items() if a < end}, set(spans.values())


def test_a_folder_url_lists_streams_and_sizes_its_shards_like_the_local_folder(served):
    local = local_shards(served)
    with serving(served) as server:
        base = server.url + "latents/"
        urls = shard_list(base)
        assert urls == [base + Path(p).name for p in local] and len(urls) == 4
        for url, path in zip(urls, local):
            samples = list(remote.read_shard(url))
            assert {s["__url__"] for s in samples} == {url}
            assert without_url(samples) == read_local([path])  # every key, extension and byte
        before = len(server.requests)
        assert sizes.shard_sizes(urls) == sizes.shard_sizes(local) == [12, 12, 12, 12]
        assert [name for name, _ in server.requests[before:]] == ["dataset.json"]  # its shard_samples: one read
        assert sizes.shard_sizes(urls, meta={}) == [12, 12, 12, 12]  # a dataset.json without them: the stats files
        assert server.count(f"{NO_STATS}.tar") == 2  # no stats either: counted by streaming (and read once above)
        assert latent_meta(base) == json.loads((served / "latents/dataset.json").read_text())
        assert latent_meta(base + "latents-{000000..000003}.tar") == latent_meta(base)


@pytest.mark.parametrize("ranges", [False, True], ids=["server-ignores-range", "server-honours-range"])
def test_a_connection_dropped_mid_shard_is_resumed(served, ranges, capsys):
    local = local_shards(served)
    name = Path(local[1]).name
    with serving(served, ranges=ranges, cuts={name: (CUT, 2)}) as server:
        skipped = Counter()
        samples = without_url(list(iter_samples(shard_list(server.url + "latents/"), skipped)))
        asked = [rng for n, rng in server.requests if n == name]
    assert samples == read_local(local) and len(samples) == 48
    assert not skipped and "warning" not in capsys.readouterr().err
    # two drops, two resumes: from the byte reached (206), or from 0 with the first bytes skipped (200)
    assert asked == [None, f"bytes={CUT}-", f"bytes={2 * CUT if ranges else CUT}-"]


@pytest.mark.parametrize("ranges", [True, False], ids=["server-honours-range", "server-ignores-range"])
def test_read_ahead_connections_give_the_same_samples_and_resume_their_pieces(served, ranges, monkeypatch, capsys):
    """``connections`` > 1 reads a shard as concurrent Range pieces (4 KB here: a dozen per shard),
    in order, each piece resumed where its connection dropped; a server without Range is read on
    one connection, as before."""
    monkeypatch.setattr(http_source, "_AHEAD_CHUNK", 4096)
    local = local_shards(served)
    name = Path(local[1]).name
    with serving(served, ranges=ranges, cuts={name: (1000, 2)}) as server:
        skipped = Counter()
        urls = shard_list(server.url + "latents/")
        samples = [s for url in urls for s in remote.iter_shard(url, skipped, connections=3)]
        asked = [rng for n, rng in server.requests if n == name]
    assert without_url(samples) == read_local(local) and len(samples) == 48 and not skipped
    assert "warning" not in capsys.readouterr().err
    if ranges:  # every piece asked once; the two dropped (whichever came first) resumed from the byte reached
        needed, every = piece_ranges(local[1], 4096)
        spans = [tuple(int(v) for v in r.removeprefix("bytes=").split("-")) for r in every]
        resumes = {f"bytes={a + k * 1000}-{b}" for a, b in spans for k in (1, 2)}
        extra = [r for r in asked if r not in every]
        firsts = [r for r in asked if r in every]
        assert asked[0] == "bytes=0-4095" and needed <= set(firsts) and len(firsts) == len(set(firsts))
        assert len(extra) == 2 and set(extra) <= resumes
    else:  # the probe's 200 (the first cut), then one connection from 0, resumed by skipping as before
        assert asked == ["bytes=0-4095", None, "bytes=1000-"]


def test_the_next_shard_is_read_ahead_behind_the_last_pieces_of_this_one(served, monkeypatch):
    """``then``: once a shard's last piece is asked for, the next shard's first pieces are asked
    for on the same connections; reading it then takes them (each piece asked once, the same
    samples as local). An unused read-ahead is dropped for the next one; a missing next shard is
    the usual unreadable shard when it is read."""
    monkeypatch.setattr(http_source, "_AHEAD_CHUNK", 4096)
    local = local_shards(served)
    names = [Path(p).name for p in local]
    with serving(served, ranges=True) as server:
        urls = [server.url + "latents/" + name for name in names]
        skipped = Counter()
        first = list(remote.iter_shard(urls[0], skipped, connections=2, then=urls[1]))
        http_source._ReadAhead._ahead[(os.getpid(), urls[1], 2)].result()  # opened: its first piece asked for
        asked_before = [rng for n, rng in server.requests if n == names[1]]
        second = list(remote.iter_shard(urls[1], skipped, connections=2))
        asked = [rng for n, rng in server.requests if n == names[1]]
        assert not http_source._ReadAhead.prefetched(urls[1], 2)  # taken
        needed, every = piece_ranges(local[1], 4096)
        assert asked_before[:1] == ["bytes=0-4095"]  # asked for before shard 1 was opened
        assert needed <= set(asked) <= every and len(asked) == len(set(asked))  # once each
        assert without_url(first + second) == read_local(local[:2]) and not skipped

        list(remote.iter_shard(urls[0], skipped, connections=2, then=urls[2]))  # shard 2 read ahead, never read ...
        list(remote.iter_shard(urls[0], skipped, connections=2, then=server.url + "latents/missing.tar"))  # ... dropped
        assert not http_source._ReadAhead.prefetched(urls[2], 2)
        assert list(remote.iter_shard(server.url + "latents/missing.tar", skipped, connections=2)) == []
    assert skipped == Counter(unreadable_shard=1)


@pytest.mark.parametrize("closes_after", [True, 3], ids=["kept-open", "server-closes-after-3"])
def test_read_ahead_pieces_reuse_kept_connections(served, monkeypatch, closes_after, capsys):
    """Against an HTTP/1.1 server the pieces ask on kept connections (far fewer connections than
    pieces); a kept connection the server closed meanwhile is replaced at once: the same samples,
    nothing skipped, no retry's wait."""
    monkeypatch.setattr(http_source, "_AHEAD_CHUNK", 4096)
    monkeypatch.setattr(http_source, "_IDLE", {})
    local = local_shards(served)
    with serving(served, ranges=True, keep_alive=closes_after) as server:
        urls = [server.url + "latents/" + Path(p).name for p in local]
        skipped = Counter()
        start = time.monotonic()
        samples = [s for url in urls for s in remote.iter_shard(url, skipped, connections=2, backoff=5.0)]
        seconds = time.monotonic() - start
    assert without_url(samples) == read_local(local) and not skipped and "warning" not in capsys.readouterr().err
    for shard in local:
        needed, every = piece_ranges(shard, 4096)
        asked = [rng for name, rng in server.requests if name == Path(shard).name]
        assert needed <= set(asked) <= every and len(asked) == len(set(asked))  # every piece asked once
    assert seconds < 5.0  # no backoff slept
    requests = len(server.requests)
    if closes_after is True:
        assert server.connections <= 2 * 2 + 1 < requests  # two threads, each with a connection or two
    else:
        assert requests / 3 <= server.connections < requests


def test_a_read_ahead_closed_before_its_first_piece_is_read_closes_that_pieces_response(served, monkeypatch):
    """The first piece's response is opened when the read-ahead opens; closed while that piece still
    waits for a connection (a prefetch nobody took), it is closed too, not left holding a connection."""
    monkeypatch.setattr(http_source, "_AHEAD_CHUNK", 4096)
    busy, release = ThreadPoolExecutor(1), threading.Event()
    busy.submit(release.wait)  # the pool's one connection is taken
    monkeypatch.setattr(http_source, "_pieces_pool", lambda connections: busy)
    name = Path(local_shards(served)[0]).name
    with serving(served, ranges=True, keep_alive=True) as server:
        ahead = http_source._ReadAhead.open(server.url + "latents/" + name, 1, 5.0, 0.0, 0, None, 2)
        assert ahead.first.response is not None and not ahead.first_piece.done()
        ahead.close()
        release.set()
        busy.shutdown()
    assert ahead.first_piece.cancelled() and ahead.first.closed and ahead.first.response is None


def test_kept_connections_are_not_used_through_a_proxy(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert http_source._kept_get("http://example.invalid/x.tar", {}, 1.0) is None


def test_a_read_ahead_piece_that_cannot_be_read_ends_the_shard_after_the_bytes_before_it(served, monkeypatch, capsys):
    monkeypatch.setattr(http_source, "_AHEAD_CHUNK", 32768)
    path = Path(local_shards(served)[2])
    with serving(served, ranges=True, unavailable_after={path.name: 1}) as server:  # 503 after the first piece
        skipped = Counter()
        got = list(remote.iter_shard(server.url + "latents/" + path.name, skipped, connections=2, retries=1, backoff=0.0))
    assert skipped == Counter(unreadable_shard=1) and 0 < len(got) < 12
    assert without_url(got) == read_local([str(path)])[: len(got)]
    assert "unreadable shard" in capsys.readouterr().err


def test_a_shard_that_changes_under_the_read_ahead_is_cut_short_not_mixed(served, tmp_path, monkeypatch, capsys):
    """Pieces fetched after the file changed (another Last-Modified) are refused: the samples
    before them are whole and the shard is counted unreadable, never spliced from two versions."""
    monkeypatch.setattr(http_source, "_AHEAD_CHUNK", 4096)
    root = tmp_path / "root"
    shutil.copytree(served / "latents", root)
    path = sorted(root.glob("*.tar"))[0]
    with serving(root, ranges=True) as server:
        skipped = Counter()
        samples = remote.iter_shard(server.url + path.name, skipped, connections=2)
        got = [next(samples)]
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 3600))  # Last-Modified moves on
        got += list(samples)
    assert skipped == Counter(unreadable_shard=1) and 1 <= len(got) < 12
    assert without_url(got) == read_local([str(path)])[: len(got)]
    assert "changed while being read" in capsys.readouterr().err


def test_the_loader_reads_ahead_over_http_with_the_batches_of_the_local_folder(served, monkeypatch):
    monkeypatch.setattr(http_source, "_AHEAD_CHUNK", 8192)
    cfg = LoaderConfig(batch_size=4, seed=3, http_connections=3)
    with serving(served, ranges=True) as server:
        streamed = latent_loader(server.url + "latents/", cfg)
        assert keys(itertools.islice(streamed, 6)) == keys(itertools.islice(latent_loader(served / "latents", cfg), 6))
        assert any(rng and rng.startswith("bytes=8192-") for _, rng in server.requests)  # pieces were asked for
    with pytest.raises(ValueError, match="http_connections must be >= 1"):
        LoaderConfig(http_connections=0)


@pytest.mark.parametrize("fault", ["always-drops", "503"])
def test_an_unreadable_shard_is_skipped_counted_and_named(served, fault, capsys):
    local = local_shards(served)
    name = Path(local[2]).name
    faults = {"cuts": {name: (4 * CUT, -1)}} if fault == "always-drops" else {"unavailable": (name,)}
    with serving(served, **faults) as server:
        urls, skipped, got = shard_list(server.url + "latents/"), Counter(), []
        for url in urls:
            got += list(remote.iter_shard(url, skipped, retries=3, backoff=0.01))
        tries = server.count(name)
    assert skipped == Counter(unreadable_shard=1) and tries == 4  # the first request and 3 retries
    expected = read_local(local[:2]) + read_local(local[3:])
    partial = [s for s in without_url(got) if s not in expected]
    assert [s for s in without_url(got) if s in expected] == expected
    assert partial == read_local([local[2]])[: len(partial)] and len(partial) < 12  # whole samples, then the cut
    assert len(partial) > 0 if fault == "always-drops" else len(partial) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and urls[2] in warnings[0] and "after 3 retries" in warnings[0]


def test_brace_patterns_lists_and_pipes(served):
    local = local_shards(served)
    with serving(served) as server:
        base = server.url + "latents/"
        pattern = base + "latents-{000000..000003}.tar"
        assert remote.list_shards(pattern) == [base + Path(p).name for p in local]
        assert remote.list_shards(f"{base}latents-000003.tar::{base}latents-000000.tar") == [
            base + "latents-000003.tar", base + "latents-000000.tar"]
        assert server.requests == []  # a pattern or a list is not fetched to be listed
        assert remote.dataset_meta(pattern)["kind"] == "latent_shards"
    assert remote.list_shards(Path(local[0]).parent / "latents-{000002..000003}.tar") == local[2:]
    pipe = f"pipe:cat '{local[0]}'"
    assert remote.list_shards(pipe) == [pipe] and remote.list_shards([pipe, local[1]]) == [pipe, local[1]]
    assert without_url(list(remote.read_shard(pipe))) == read_local(local[:1])
    assert sizes.shard_sizes([pipe]) == [12]


def test_a_bad_source_is_one_clear_line(served, tmp_path, monkeypatch):
    def message(error: type, call, *args) -> str:
        with pytest.raises(error) as caught:
            call(*args)
        text = str(caught.value)
        assert "\n" not in text
        return text

    with serving(served) as server:
        assert "404" in message(ValueError, remote.list_shards, server.url + "nowhere/")
        assert "brace pattern" in message(ValueError, remote.list_shards, server.url + "no_list/")
        assert "has no dataset.json" in message(FileNotFoundError, latent_meta, server.url + "nowhere/")
        missing = message(remote.SourceNotFound, lambda: list(remote.read_shard(server.url + "latents/latents-000009.tar")))
        assert "404" in missing and server.count("latents-000009.tar") == 1  # not found: no retry
    assert message(ValueError, remote.list_shards, tmp_path) == f"no shards in {tmp_path}"
    assert "no such folder or file" in message(ValueError, remote.list_shards, tmp_path / "nope")
    closed = f"http://127.0.0.1:{free_port()}/x.tar"
    assert "after 2 retries" in message(remote.SourceError, lambda: remote.open_stream(closed, retries=2, backoff=0.01))
    failed = message(remote.SourceError, lambda: list(remote.read_shard("pipe:exit 3")))
    assert "status 3" in failed
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if fsspec were not installed
    assert "needs the fsspec package" in message(remote.SourceError, remote.open_stream, "s3://bucket/latents/x.tar")
    assert "fsspec" in message(ValueError, remote.list_shards, "s3://bucket/latents/")


def test_the_loader_splits_and_resumes_a_url_as_it_does_the_local_folder(served):
    cfg = LoaderConfig(batch_size=4, seed=3)
    with serving(served) as server:
        url = server.url + "latents/"
        for rank in (0, 1):
            local, streamed = latent_loader(served / "latents", cfg, rank, 2), latent_loader(url, cfg, rank, 2)
            assert keys(itertools.islice(streamed, 3)) == keys(itertools.islice(local, 3))
            resumed = latent_loader(url, cfg, rank, 2)
            resumed.load_state_dict(json.loads(json.dumps(streamed.state_dict())))
            assert keys(itertools.islice(resumed, 4)) == keys(itertools.islice(local, 4))


def test_encode_reads_its_input_shards_over_http(image_shards, latent_shards, tmp_path):
    from data_tools import encode

    config = latent_shards.parent / "encode.yaml"  # the latent_shards fixture's own
    with serving(image_shards.parent) as server:
        url = server.url + image_shards.name + "/"
        assert encode.main(["--input", url, "--output", str(tmp_path / "lat"), "--config", str(config)]) == 0
    written = complete_shards(tmp_path / "lat")
    assert [p.name for p in written] == [p.name for p in complete_shards(latent_shards)]
    assert all(p.read_bytes() == (latent_shards / p.name).read_bytes() for p in written)  # as from the local folder
    assert json.loads((tmp_path / "lat/dataset.json").read_text())["input"] == url


def test_encode_leaves_the_shard_of_an_unreadable_input_unwritten_and_a_rerun_finishes(image_shards, latent_shards, tmp_path, capsys):
    """Nothing partial is committed: the latent shard of an input cut short is not written (a rerun
    would otherwise skip it for good), the others are, the run says so in one line and exits 2."""
    from data_tools import encode

    config, out = latent_shards.parent / "encode.yaml", tmp_path / "lat"
    bad = complete_shards(image_shards)[1].name
    args = ["--input", None, "--output", str(out), "--config", str(config)]
    with serving(image_shards.parent, cuts={bad: (3 * CUT, -1)}) as server:
        args[1] = server.url + image_shards.name + "/"
        assert encode.main(args) == 2
    err = capsys.readouterr().err
    assert "latents-000001.tar not written" in err and "1 latent shard(s) not written" in err
    assert [p.name for p in complete_shards(out)] == ["latents-000000.tar", "latents-000002.tar", "latents-000003.tar"]
    assert not (out / "dataset.json").exists()
    with serving(image_shards.parent) as server:
        args[1] = server.url + image_shards.name + "/"
        assert encode.main(args) == 0
    assert all(p.read_bytes() == (latent_shards / p.name).read_bytes() for p in complete_shards(out))


def keys(batches) -> list[str]:
    return [k for batch in batches for k in batch["key"]]


def test_config_fields_keep_urls_as_text_and_local_folders_as_paths(tmp_path):
    url = "http://127.0.0.1:8000/latents/"
    cfg = load_config(TrainConfig, None, [f"data.latents={url}"])
    assert isinstance(cfg.data.latents, URL) and cfg.data.latents == url  # Path() would collapse the //
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(TrainConfig, tmp_path / "config.yaml").data.latents == url
    assert load_config(TrainConfig, None, ["data.latents=runs/x"]).data.latents / "dataset.json" == Path("runs/x/dataset.json")
    pattern = "pipe:curl -s http://h/latents-{000000..000009}.tar"
    assert load_config(TrainConfig, None, [f"data.latents={pattern}"]).data.latents == pattern


TINY = ["deepspeed.enabled=false", "model.overrides={depth: 2}", "data.loader.batch_size=8", "optim.lr=2e-3",
        "optim.warmup_steps=2", "logging.every=1", "sampling.steps=2", "steps=3", "run=t"]


def losses(latents: str | Path, out: Path) -> list[float]:
    assert train.main([f"data.latents={latents}", f"output_dir={out}", *TINY]) == 0
    return [json.loads(line)["loss"] for line in (out / "t/metrics.jsonl").read_text().splitlines() if "loss" in line]


@pytest.mark.slow
def test_training_streams_from_http_with_the_same_losses_as_from_the_local_folder(served, tmp_path):
    local = losses(served / "latents", tmp_path / "local")
    names = [Path(p).name for p in local_shards(served)]
    with serving(served, cuts={name: (CUT, 1) for name in names}) as server:  # each shard's first connection drops
        folder = losses(server.url + "latents/", tmp_path / "folder")
        pattern = losses(server.url + "latents/latents-{000000..000003}.tar", tmp_path / "pattern")
        assert any(server.count(name) >= 2 for name in names)  # a shard was read, dropped and resumed
    assert len(local) == 3 and folder == local and pattern == local


def autoencoder_losses(shards: str | Path, out: Path) -> list[dict]:
    from pipeline import train_autoencoder

    tiny = ["model.block_out_channels=[32, 32]", "data.held_out=8", "factor_samples=32", "data.loader.batch_size=8"]
    assert train_autoencoder.main([f"data.shards={shards}", f"output_dir={out}", "run=ae", "eval_every=2", "logging.every=1",
                                   "steps=2", *tiny]) == 0
    rows = [json.loads(line) for line in (out / "ae/metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("time", "lr")} for row in rows]  # losses, held-out PSNR


@pytest.mark.slow
def test_the_autoencoder_trains_on_image_shards_over_http(image_shards, tmp_path):
    local = autoencoder_losses(image_shards, tmp_path / "local")
    with serving(image_shards.parent) as server:
        streamed = autoencoder_losses(f"{server.url}{image_shards.name}/", tmp_path / "url")
    assert len(local) == 2 and "psnr_held_out_64" in local[-1] and streamed == local  # held-out shard too


def test_training_on_a_missing_or_unreachable_source_is_one_line(tmp_path, capsys):
    from pipeline import train
    from tests.helpers import free_port

    for source in (tmp_path / "nowhere", f"http://127.0.0.1:{free_port()}/latents/"):
        assert train.main([f"data.latents={source}", "deepspeed.enabled=false", f"output_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pipeline.train: data error:") and str(source).rstrip("/") in err[0]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_files_reads_what_tarfile_reads(tmp_path, fmt):
    """The loader's tar reader on long (pax / GNU) and non-ASCII names, a directory, a link, an
    empty file, a metadata member (skipped as webdataset skips it); truncation is an EOFError."""
    import io as _io

    from pipeline.data.tars import tar_files

    long = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 60
    files = {f"{long}/k1.latent.npy": b"x" * 1000, "k1.txt": "é caption".encode(), "k2.empty": b"", "__meta__": b"m",
             "ké2.json": b"{}"}
    buffer = _io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        tar.addfile(_dir_info())
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, _io.BytesIO(data))
        link = tarfile.TarInfo("k3.link")
        link.type, link.linkname = tarfile.SYMTYPE, "k1.txt"
        tar.addfile(link)
    data = buffer.getvalue()
    got = list(tar_files(_io.BytesIO(data)))
    assert got == [(name, body) for name, body in files.items() if name != "__meta__"]
    with pytest.raises(EOFError):
        list(tar_files(_io.BytesIO(data[:1500])))


def _dir_info() -> tarfile.TarInfo:
    info = tarfile.TarInfo("folder")
    info.type = tarfile.DIRTYPE
    return info


def test_a_resume_reads_each_waiting_sample_alone_not_its_shard(tmp_path):
    """With many buckets, samples wait in partial buckets across many shards. A resume over HTTP
    fetches each of them by its byte span (a bounded Range of exactly its bytes), not by reading its
    shard again from the start: whole shards are read only where the stream's schedule goes on."""
    from tests.test_buckets import write_bucketed_shards

    folder = tmp_path / "latents"
    shards = write_bucketed_shards(folder, 12, 10, weights=(4, 3, 3))
    names = [Path(p).name for p in shards]
    (folder / "dataset.json").write_text(json.dumps({"shards": names, "shard_samples": dict.fromkeys(names, 10)}))
    cfg = LoaderConfig(batch_size=6, shuffle_buffer=4, seed=2, http_connections=1)  # a shard read is one plain GET: told apart from spans
    with serving(tmp_path, ranges=True) as server:
        url = server.url + "latents/"
        reference = keys(itertools.islice(latent_loader(url, cfg), 16))
        stopped = latent_loader(url, cfg)
        before = keys(itertools.islice(stopped, 11))
        state = json.loads(json.dumps(stopped.state_dict()))
        server.sent.clear()
        resumed = latent_loader(url, cfg)
        resumed.load_state_dict(state)
        after = keys(itertools.islice(resumed, 5))
    assert before + after == reference
    schedule, waiting = resumed.schedule, state["waiting"]["0"]
    ahead = scheduled_shards(schedule, state["offsets"]["0"], resumed.state_dict()["offsets"]["0"])
    elsewhere = [w for w in waiting if w[1] not in ahead]
    assert len(elsewhere) >= 4, "the test must stop with samples waiting in shards the stream does not read next"
    ranged = [(name, asked, sent) for name, asked, sent in server.sent if asked]
    assert sorted(ranged) == sorted((names[shard], f"bytes={start}-{end - 1}", end - start) for _, shard, start, end in waiting)
    whole = {name for name, asked, _ in server.sent if not asked and name != "dataset.json"}
    assert whole <= {names[i] for i in ahead}


def scheduled_shards(schedule, first: int, last: int) -> set[int]:
    """The shards stream 0 reads from emission offset ``first`` to ``last``."""
    found = set()
    for offset in range(first, last):
        epoch, position, _ = schedule.seek(0, offset)
        found.update(schedule.groups(epoch, 0)[position])
    return found


@pytest.mark.slow
def test_latents_away_from_their_encoders_stop_before_step_1_or_train_with_encoders_given(
        latent_shards, tiny_vae_dir, tiny_text_encoders_dir, tmp_path, capsys):
    """A latent folder's dataset.json names its encoders relative to it. Streamed from a URL, or
    copied elsewhere, those paths resolve nowhere: the run stops before step 1 with one line naming
    the option; with ``encoders.*`` it trains through the final grid, and its export names the
    local encoders (``export.encoders=reference``: recorded, not copied), so ``pipeline.sample`` runs
    from it; moved without them, it needs the ``--encoder-*`` flags."""
    from pipeline import sample

    root = tmp_path / "served"
    shutil.copytree(latent_shards, root / "latents")  # dataset.json as encode wrote it: encoder paths relative to it
    recorded = json.loads((root / "latents/dataset.json").read_text())["config"]["vae"]["path"]
    assert recorded.startswith("../")
    text = load_config(TextEncodersConfig, tiny_text_encoders_dir / "encoders.yaml")
    given = [f"encoders.vae={tiny_vae_dir}", f"encoders.t5={text.t5.path}", f"encoders.clip={text.clip.path}"]
    tiny = [f"output_dir={tmp_path / 'runs'}", *TINY[:-2], "steps=2"]
    with serving(root) as server:
        for latents, run in ((root / "latents", "moved"), (server.url + "latents/", "streamed")):
            capsys.readouterr()
            assert train.main([f"data.latents={latents}", f"run={run}", *tiny]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"'{recorded}'" in err and "give encoders.vae=PATH" in err, err
            assert not (tmp_path / "runs" / run / "checkpoints").exists()  # stopped before step 1
        assert train.main([f"data.latents={server.url}latents/", "run=ok", *tiny, *given, "export.encoders=reference"]) == 0
    assert "encoders from encoders.vae=" in capsys.readouterr().out
    assert (tmp_path / "runs/ok/samples/final.png").is_file()
    exported = json.loads((tmp_path / "runs/ok/model/model_index.json").read_text())["info"]
    assert (tmp_path / "runs/ok/model" / exported["vae"]["path"]).resolve() == Path(tiny_vae_dir).resolve()
    out = tmp_path / "grid.png"
    assert sample.main(["--model", str(tmp_path / "runs/ok/model"), "--prompt", "a red circle", "--steps", "2", "--output", str(out)]) == 0
    assert out.is_file()
    shutil.copytree(tmp_path / "runs/ok/model", tmp_path / "elsewhere/much/deeper/model")  # a model moved without its encoders
    args = ["--model", str(tmp_path / "elsewhere/much/deeper/model"), "--prompt", "a red circle", "--steps", "2", "--output", str(out)]
    capsys.readouterr()
    assert sample.main(args) == 2
    assert "give --encoder-vae=PATH" in capsys.readouterr().err
    assert sample.main([*args, *(f"--encoder-{g.split('=')[0][9:]}={g.split('=')[1]}" for g in given)]) == 0


def test_pipe_latents_need_their_dataset_json_named_then_train(latent_shards, tmp_path, capsys):
    """``pipe:`` commands have no folder holding a dataset.json: one line naming ``data.meta``; with
    it the run trains, its shards sized once by streaming (no stats or shard list to read)."""
    pipe = f"pipe:cat {latent_shards}/latents-{{000000..000003}}.tar"
    tiny = [f"data.latents={pipe}", f"output_dir={tmp_path}", *TINY[:-2], "steps=1"]
    assert train.main([*tiny, "run=no_meta"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "give data.meta=" in err, err
    assert train.main([*tiny, "run=meta", f"data.meta={latent_shards / 'dataset.json'}"]) == 0
    cached = json.loads((tmp_path / "meta/shard_sizes.json").read_text())
    assert cached["sizes"] == [12, 12, 12, 12] and cached["shards"][0] == f"pipe:cat {latent_shards}/latents-000000.tar"


def test_stats_files_answering_403_are_counted_around_not_fatal(served, capsys):
    """S3 without ListBucket answers 403 for a key that is not there: the shard is counted instead."""
    with serving(served, forbidden=r"_stats\.json$") as server:
        urls = shard_list(server.url + "latents/")
        assert sizes.shard_sizes(urls, meta={}) == [12, 12, 12, 12]
        assert all(server.count(Path(url).name) == 1 for url in urls)  # each shard read once to count it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 of 4 shard(s) have no recorded size" in err[0]


@pytest.mark.xdist_group("launch")  # the one 2-process launch runs once (make test: pytest-xdist)
@pytest.mark.slow
def test_two_ranks_count_unsized_shards_once_over_http(launched_jobs):
    """Latents served with no recorded size: in a 2-process run only the main rank counts the shards
    (each tar read once for that) and the count is cached in the run; the ranks then read only what
    they train on (each its first shard, here). Before, every rank streamed every shard to size it."""
    from tests import jobs

    assert all(r["ok"] and r["world"] == 2 for r in jobs.results(launched_jobs, "http-sizes")), jobs.results(launched_jobs, "http-sizes")
    reads = Counter(name for name, _ in json.loads((launched_jobs / "http_requests.json").read_text()) if name.endswith(".tar"))
    assert len(reads) == 4 and sum(reads.values()) <= 4 + 2, reads
    assert json.loads((launched_jobs / "http-sizes/shard_sizes.json").read_text())["sizes"] == [12, 12, 12, 12]
