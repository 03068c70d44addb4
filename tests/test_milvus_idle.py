"""A connection to Milvus left idle (an API server between requests, a minute of image generation between two
searches) stays usable: pymilvus' default keepalive pings draw GOAWAY "too_many_pings" from Milvus' gRPC server
after about 30 s idle, and a call made as the connection closes fails UNAVAILABLE."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_idle_connection_draws_no_goaway(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from mmrag.config import load_settings
        from mmrag.index import MilvusIndex
        index = MilvusIndex(load_settings(data_dir={str(tmp_path / "kb")!r}))
        index.client.list_collections()
        time.sleep(40)  # pymilvus' default pings (every 10 s) draw GOAWAY within this
        print(index.client.list_collections())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "too_many_pings" not in done.stderr, done.stderr[-2000:]
