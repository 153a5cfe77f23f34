"""The tests' launcher (tests/launch.py) on tiny scripts: each rank's environment, the hygiene, the
deadline that kills every process (the ranks a process started included), the failure report, and
waiting for the ranks a process started."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest
from launch import REPO, TESTS, LaunchError, launch_nodes, launch_ranks, run_script

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK")
_SHOW_ENV = """
import json, os
keys = {keys!r} + ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "PYTHONPATH", "INHERITED", "DROPPED")
print(json.dumps({{k: os.environ.get(k) for k in keys}}))
"""


def _script(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ranks_get_torchrun_variables_and_nothing_of_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what an in-process Trainer of an earlier test leaves behind, plus variables of the caller
    for key in (*_ENV_KEYS, "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "7")
    monkeypatch.setenv("INHERITED", "yes")
    monkeypatch.setenv("DROPPED", "yes")
    script = _script(tmp_path, "show.py", _SHOW_ENV.format(keys=_ENV_KEYS))
    ranks = launch_ranks([script], 4, ranks_per_node=2, env={"DROPPED": None}, timeout=60)
    seen = [json.loads(r.stdout) for r in ranks]
    assert [r.name for r in ranks] == ["rank 0", "rank 1", "rank 2", "rank 3"]
    for rank, env in enumerate(seen):
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "4"
        assert env["LOCAL_RANK"] == str(rank % 2) and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["NODE_RANK"] == env["GROUP_RANK"] == str(rank // 2)
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == seen[0]["MASTER_PORT"] != "7"
        assert env["OMP_NUM_THREADS"] == "1"
        assert env["PYTHONPATH"] == os.pathsep.join((str(REPO), str(TESTS)))
        assert env["INHERITED"] == "yes" and env["DROPPED"] is None

    nodes = launch_nodes([script], 2, timeout=60)
    for node, result in enumerate(nodes):
        env = json.loads(result.stdout)
        assert result.name == f"node {node}" and env["NODE_RANK"] == str(node)
        assert env["RANK"] is env["LOCAL_RANK"] is env["WORLD_SIZE"] is None  # Lightning's to set
        assert env["MASTER_PORT"] == json.loads(nodes[0].stdout)["MASTER_PORT"] != "7"
    alone = json.loads(run_script([script], timeout=60).stdout)
    assert all(alone[key] is None for key in (*_ENV_KEYS, "MASTER_ADDR", "MASTER_PORT"))


def test_a_hung_launch_is_killed_whole_and_names_the_hung_rank(tmp_path: Path) -> None:
    # rank 1 starts a child of its own (as Lightning starts a node's ranks), then both hang
    script = _script(
        tmp_path,
        "hang.py",
        f"""
        import os, time
        if os.environ["RANK"] == "1":
            child = os.fork()
            if child == 0:
                time.sleep(600)
            open({str(tmp_path / "child.pid")!r}, "w").write(str(child))
            print("rank 1 waits", flush=True)
            time.sleep(600)
        print("rank 0 done", flush=True)
        """,
    )
    start = time.monotonic()
    with pytest.raises(LaunchError) as failure:
        launch_ranks([script], 2, timeout=5)
    assert time.monotonic() - start < 30
    message = str(failure.value)
    assert "rank 1 still running after 5 s" in message and "rank 0," not in message
    assert "===== rank 0: exit status 0 =====" in message and "rank 0 done" in message
    assert "===== rank 1: exit status -9 =====" in message and "rank 1 waits" in message
    assert not _alive(int((tmp_path / "child.pid").read_text()))


def test_a_failed_rank_is_reported_by_name_with_its_error(tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        "fail.py",
        """
        import os
        print("rank", os.environ["RANK"], "starts", flush=True)
        if os.environ["RANK"] == "1":
            raise ValueError("rank 1 gives up")
        """,
    )
    with pytest.raises(LaunchError) as failure:
        launch_ranks([script], 2, timeout=60)
    message = str(failure.value)
    assert "===== rank 0: exit status 0 =====" in message and "rank 0 starts" in message
    assert "===== rank 1: exit status 1 =====" in message
    assert "ValueError: rank 1 gives up" in message.split("===== rank 1")[1]
    # check=False hands the failure to the test
    ok, failed = launch_ranks([script], 2, timeout=60, check=False)
    assert (ok.returncode, failed.returncode) == (0, 1) and "Traceback" in failed.stderr


def test_the_launch_waits_for_the_ranks_a_process_started(tmp_path: Path) -> None:
    # the process exits at once; the rank it started writes its result a second later
    result = tmp_path / "rank1.txt"
    script = _script(
        tmp_path,
        "parent.py",
        f"""
        import os, time
        if os.fork() == 0:
            time.sleep(1)
            open({str(result)!r}, "w").write("written")
        """,
    )
    run_script([script], timeout=60)
    assert result.read_text() == "written"
