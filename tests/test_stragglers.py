"""``accelerate launch -m data_tools.encode`` with one rank far slower than the other.

The slow rank is real: its input shard comes from an HTTP server on loopback that answers that
file only after ``DELAY`` seconds, longer than the process group's timeout (``group_timeout``).
The job must still end well, as one process's encode, because no collective runs after the
start: the main process waits for the other ranks' completion files, not at a barrier."""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_tools import split
from pipeline.data.shards import complete_shards, iter_samples
from tests.helpers import accelerate_launch

GROUP_TIMEOUT = 5  # seconds: the process group's
DELAY = 8  # seconds before the slow rank's shard is served: well past GROUP_TIMEOUT


class SlowHandler(SimpleHTTPRequestHandler):
    """Serves files; the first GET of ``server.slow`` waits ``DELAY`` seconds first."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if Path(self.path).name == self.server.slow:
            with self.server.lock:
                first, self.server.slow_served = not self.server.slow_served, True
            if first:
                time.sleep(DELAY)
        super().do_GET()


@contextlib.contextmanager
def serving_slowly(root: Path, slow: str) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 over ``root``; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SlowHandler, directory=str(root)))
    server.daemon_threads, server.slow, server.slow_served, server.lock = True, slow, False, threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def keys(folder: Path) -> list[str]:
    return sorted(s["__key__"] for s in iter_samples(complete_shards(folder)))


def test_a_rank_slowed_past_the_group_timeout_still_finishes_the_encode(image_shards, latent_shards, tmp_path):
    """Rank 1 owns input shard 1, served ``DELAY`` s late; rank 0 waits for it (saying so) and
    writes dataset.json; both exit 0; the latent folder has one process's keys and counts."""
    config, out = latent_shards.parent / "encode.yaml", tmp_path / "lat"  # the latent_shards fixture's own
    slow = complete_shards(image_shards)[1].name  # rank 1's of 2 (i % 2 == 1)
    with serving_slowly(image_shards.parent, slow) as url:
        args = ["-m", "data_tools.encode", "--input", url + image_shards.name + "/", "--output", str(out), "--config", str(config),
                f"group_timeout={GROUP_TIMEOUT}"]
        start = time.monotonic()
        result = accelerate_launch(args, processes=2, timeout=300)
        took = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert took > DELAY > GROUP_TIMEOUT  # the slow rank really was slow
    assert "rank 1/2" in result.stdout and "waiting for rank(s) 1" in result.stdout, result.stdout
    one, two = (json.loads((folder / "dataset.json").read_text()) for folder in (latent_shards, out))
    for field in ("samples", "skipped", "shards", "latent_shape", "resolution", "latent_dtype"):
        assert two[field] == one[field], field
    assert keys(out) == keys(latent_shards) and len(keys(out)) == 48
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in latent_shards.iterdir())  # no marker left


def test_the_main_process_waits_for_this_launchs_completion_files_only(tmp_path, capsys):
    """A file of an earlier (crashed) launch does not count; past the wait, one line names the
    ranks still missing; once all are in, the files are gone."""
    split.mark_done(tmp_path, 1, "this")
    split.mark_done(tmp_path, 2, "earlier")
    with pytest.raises(TimeoutError, match=r"^rank\(s\) 2, 3 did not finish their shards within wait_timeout=0.3 s: ") as err:
        split.wait_for_ranks(tmp_path, 4, "this", 0.3, "p")
    assert "\n" not in str(err.value)
    assert capsys.readouterr().out.startswith("p: rank 0 is done; waiting for rank(s) 2, 3 to finish their shards (0 s")
    split.mark_done(tmp_path, 2, "this")
    split.mark_done(tmp_path, 3, "this")
    split.wait_for_ranks(tmp_path, 4, "this", 0.3, "p")
    assert list(tmp_path.iterdir()) == []
